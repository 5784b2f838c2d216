"""Building the toy world: its data splits and its SFT'd "base" policies (see task.py, model.py)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from trace.prompting import LABELS, label_to_teacher_prefix, reference_context, render_prompt
from trace.settings import ToyBaseJob, ToyWorld
from trace.toy import task
from trace.toy.model import build_model, train_tokenizer
from trace.toy.sft import run_sft

log = logging.getLogger(__name__)


def _write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_toy_data(cfg: ToyWorld, out_dir: Path) -> None:
    """train / val / sft (train + multiple-choice practice) and the five test splits, as JSONL."""
    cfg = ToyWorld.from_mapping(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed
    train = task.make_split("train", cfg.n_train, seed, task.TRAIN_OPS)
    # SFT also practises the multiple-choice format, so the base can answer the OOD split at all;
    # RL trains on arithmetic only, which makes choice_ood a genuine out-of-distribution probe.
    # The SFT demonstrator slips (task.demonstrator_solution); RL and evaluation data stay clean.
    slips = random.Random(f"sft_slips:{seed}")
    demonstrations = [{**r, "solution": task.demonstrator_solution(r["solution"], slips, cfg.sft_slip_rate)}
                      for r in train]
    sft = (demonstrations + task.make_split("sft_choice", cfg.n_sft_choice, seed, task.TRAIN_OPS)
           + privileged_examples(train, cfg.sft_privileged_share, seed))
    splits = {"train": train, "sft": sft, "val": task.make_split("val", cfg.n_val, seed, task.TRAIN_OPS)}
    for name, n_ops in task.TEST_SPLITS.items():
        splits[name] = task.make_split(name, cfg.n_test, seed, n_ops)
    splits[task.OOD_SPLIT] = task.make_split(task.OOD_SPLIT, cfg.n_test, seed, task.TRAIN_OPS)
    for name, records in splits.items():
        _write_jsonl(records, out_dir / f"{name}.jsonl")
    manifest = {name: len(records) for name, records in splits.items()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def privileged_examples(train: list[dict], share: float, seed: int) -> list[dict]:
    """SFT examples whose prompt carries a teacher's private system turn, paired with the CLEAN solution.

    The toy world's stand-in for an LLM's in-context ability: a pretrained LLM can use a hint or a
    reference solution in its context; a tiny model trained from scratch has never seen a system turn,
    so without these examples its "teacher" reads unseen text and is far worse than the student
    (issue 19: log q − log p of the correct token at the first error −6.8 nats). A ``share`` of the
    training problems gets one example per private form the teachers use (trace/train/teacher.py):
    - label: one diagnostic label prefix (any label of the annotation vocabulary, as any tier may emit
      it) → the slip-free solution: "with a hint, work carefully";
    - reference: the reference solution in the system turn → that solution (copying from context).
    A label carries only its type and description, never positions or values (paper §2), so what the
    model learns from it is a mode (careful vs habitual slips), not the answer.
    """
    if share <= 0:
        return []
    rng = random.Random(f"sft_privileged:{seed}")
    labels = sorted(LABELS)
    examples = []
    for record in train:
        if rng.random() < share:
            examples.append({**record, "id": f"{record['id']}-label",
                             "private_context": label_to_teacher_prefix(rng.choice(labels))})
        if rng.random() < share:
            examples.append({**record, "id": f"{record['id']}-reference",
                             "private_context": reference_context(record)})
    return examples


def build_toy_base(cfg: ToyBaseJob, data_dir: Path, out_dir: Path) -> None:
    """Tokenizer trained on the SFT corpus (chat markup and private turns included) → random tiny
    Qwen3 → SFT. ``sft.steps`` counts steps over the plain examples: with privileged examples in the
    corpus the run is lengthened in proportion, so the plain behaviour the student starts from sees as
    many updates as without them (the log says both numbers)."""
    cfg = ToyBaseJob.from_mapping(cfg)
    records = [json.loads(line) for line in (data_dir / "sft.jsonl").read_text().splitlines()]
    # a throw-away tokenizer only to render the chat markup once, so the real one learns it too
    markup = train_tokenizer([r["solution"] for r in records[:50]], 64, out_dir / "tokenizer-bootstrap")
    corpus = [render_prompt(markup, r, cfg.thinking, system_prefix=r.get("private_context"))
              + r["solution"] + "<|im_end|>" for r in records]
    tokenizer = train_tokenizer(corpus, cfg.tokenizer_vocab, out_dir / "tokenizer")
    model = build_model(tokenizer, cfg.size, cfg.seed)
    sft = cfg.sft
    n_plain = sum(1 for r in records if not r.get("private_context"))
    steps = round(sft.steps * len(records) / max(n_plain, 1))
    log.info("SFT: %d examples (%d plain, %d with a private turn): %d steps (sft.steps %d over the plain ones)",
             len(records), n_plain, len(records) - n_plain, steps, sft.steps)
    run_sft(model, tokenizer, records, out_dir, steps=steps, batch_size=sft.batch_size, lr=sft.lr,
            warmup=sft.warmup, weight_decay=sft.weight_decay, thinking=cfg.thinking, seed=cfg.seed)
