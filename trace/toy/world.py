"""Building the toy world: its data splits and its SFT'd "base" policies (see task.py, model.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from trace.prompting import render_prompt
from trace.toy import task
from trace.toy.model import build_model, train_tokenizer
from trace.toy.sft import run_sft


def _write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_toy_data(cfg: dict, out_dir: Path) -> None:
    """train / val / sft (train + multiple-choice practice) and the five test splits, as JSONL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg["seed"]
    train = task.make_split("train", cfg["n_train"], seed, task.TRAIN_OPS)
    # SFT also practises the multiple-choice format, so the base can answer the OOD split at all;
    # RL trains on arithmetic only, which makes choice_ood a genuine out-of-distribution probe.
    # The SFT demonstrator slips (task.demonstrator_solution); RL and evaluation data stay clean.
    slips = random.Random(f"sft_slips:{seed}")
    demonstrations = [{**r, "solution": task.demonstrator_solution(r["solution"], slips, cfg["sft_slip_rate"])}
                      for r in train]
    sft = demonstrations + task.make_split("sft_choice", cfg["n_sft_choice"], seed, task.TRAIN_OPS)
    splits = {"train": train, "sft": sft, "val": task.make_split("val", cfg["n_val"], seed, task.TRAIN_OPS)}
    for name, n_ops in task.TEST_SPLITS.items():
        splits[name] = task.make_split(name, cfg["n_test"], seed, n_ops)
    splits[task.OOD_SPLIT] = task.make_split(task.OOD_SPLIT, cfg["n_test"], seed, task.TRAIN_OPS)
    for name, records in splits.items():
        _write_jsonl(records, out_dir / f"{name}.jsonl")
    manifest = {name: len(records) for name, records in splits.items()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build_toy_base(cfg: dict, data_dir: Path, out_dir: Path) -> None:
    """Tokenizer trained on the SFT corpus (chat markup included) → random tiny Qwen3 → SFT."""
    records = [json.loads(line) for line in (data_dir / "sft.jsonl").read_text().splitlines()]
    # a throw-away tokenizer only to render the chat markup once, so the real one learns it too
    markup = train_tokenizer([r["solution"] for r in records[:50]], 64, out_dir / "tokenizer-bootstrap")
    corpus = [render_prompt(markup, r, cfg["thinking"]) + r["solution"] + "<|im_end|>" for r in records]
    tokenizer = train_tokenizer(corpus, cfg["tokenizer_vocab"], out_dir / "tokenizer")
    model = build_model(tokenizer, cfg["size"], cfg["seed"])
    sft = cfg["sft"]
    run_sft(model, tokenizer, records, out_dir, steps=sft["steps"], batch_size=sft["batch_size"], lr=sft["lr"],
            warmup=sft["warmup"], weight_decay=sft["weight_decay"], thinking=cfg["thinking"], seed=cfg["seed"])
