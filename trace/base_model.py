"""Base policies (and frozen annotators) of the paper study, materialised as a local model folder.

One entry of ``models:`` / ``annotator_models:`` in a paper-study config becomes
``results/base/<name>/``, from (first that applies):

* ``path``: a local folder that already holds the model (cluster users without hub access). Its
  files are linked, not copied (8B weights are 16 GB).
* ``init``: a randomly initialised small Qwen3 with the real tokenizer, briefly SFT'd on the
  training set (the CPU smoke study only: same rules and code as the paper, tiny sizes).
* ``repo`` + ``revision``: downloaded from the Hugging Face hub at that pinned commit.

Every file listed in ``sha256`` is checked before any GPU time is spent on the model. The
offline check in :func:`availability_problem` runs while Snakemake plans the DAG, so a dry run
fails in seconds, naming the model, instead of a job failing hours later.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

class ModelUnavailableError(FileNotFoundError):
    """A base model that cannot be materialised here, with what to do about it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hashes(folder: Path, expected: Mapping[str, str] | None, name: str) -> dict[str, str]:
    """Every expected file present with the expected sha256 (config and tokenizer: cheap, decisive)."""
    checked = {}
    for file_name, want in (expected or {}).items():
        path = Path(folder) / file_name
        if not path.exists():
            raise ModelUnavailableError(f"model {name}: {path} is missing (expected sha256 {want[:12]}…)")
        got = sha256_of(path)
        if got != want:
            raise ModelUnavailableError(f"model {name}: {path} has sha256 {got[:12]}…, expected {want[:12]}… "
                                        f"(models.{name}.sha256): wrong revision or a modified file")
        checked[file_name] = got
    return checked


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo: str, revision: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    return isinstance(found, str)


WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def model_folder_problem(folder: Path, label: str) -> str | None:
    """None if ``folder`` holds a loadable Hugging Face checkpoint (config.json with a model_type, the
    weights, every shard its index lists); else one line naming the file. Cheap: while planning."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        return f"{label} {folder} has no config.json"
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        return f"{label} {config}{where}: not valid JSON ({getattr(error, 'msg', error)})"
    if not isinstance(data, dict) or "model_type" not in data:
        return f"{label} {config}: no model_type: not a Hugging Face model config"
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as error:
                return f"{label} {index}: unreadable weight index ({error})"
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                return f"{label} {folder}: {len(missing)} of {len(shards)} weight files in {index_name} missing ({missing[0]})"
            return None
    if not any(path.is_file() for pattern in WEIGHT_GLOBS for path in folder.glob(pattern)):
        return f"{label} {folder} has no weights (no *.safetensors or pytorch_model*.bin)"
    return None


def availability_problem(name: str, entry, out_dir: Path, section: str = "models") -> str | None:
    """None if ``entry`` (a ``trace.settings.PretrainedModel``) can be materialised here (or already was);
    else one line saying what to do.
    A local ``path`` folder is checked whole (config, weights, the listed sha256) before any job."""
    if entry.init or model_folder_problem(out_dir, "") is None:
        return None
    if entry.path:
        folder = Path(entry.path).expanduser()
        problem = model_folder_problem(folder, f"model {name}: {section}.{name}.path =")
        if problem is None:
            try:
                check_hashes(folder, entry.sha256, name)
            except ModelUnavailableError as error:
                problem = str(error)
        if problem and not (folder / "config.json").is_file():
            problem += f"; point it at a folder holding the Hugging Face checkpoint of {entry.repo or name}"
        return problem
    repo, revision = entry.repo, entry.revision
    if _in_hub_cache(repo, revision) or hub_reachable():
        return None
    return (f"model {name} ({repo} @ {revision[:12]}) is not available: the Hugging Face hub is unreachable "
            f"(offline) and it is not in the local hub cache. Download it where you have internet "
            f"(huggingface-cli download {repo} --revision {revision} --local-dir DIR) and set "
            f"{section}.{name}.path: DIR in your config")


def repair_problem(name: str, out_dir: Path) -> str | None:
    """A materialised base folder that lost its weights or config (deleted, a broken link): one line;
    the base_model job must run again."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    return model_folder_problem(out_dir, f"model {name}:")


def materialise(name: str, entry, out_dir: Path, train_data: Path | None = None,
                thinking: bool = True, section: str = "models") -> Path:
    """Make ``out_dir`` a loadable model folder for ``entry``; write ``out_dir/base_model.json``."""
    out_dir = Path(out_dir)
    problem = availability_problem(name, entry, out_dir, section)
    if problem:
        raise ModelUnavailableError(problem)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if entry.path:
        source = Path(entry.path).expanduser().resolve()
        for item in source.iterdir():
            (tmp / item.name).symlink_to(item)
        origin = f"local:{source}"
    elif entry.init:
        if train_data is None:
            raise ValueError(f"model {name}: an init model is SFT'd on the training set; pass --train-data")
        _random_init_and_sft(entry.init, tmp, Path(train_data), thinking)
        origin = f"init:{entry.init.config}+sft"
    else:
        from huggingface_hub import snapshot_download

        log.info("downloading %s @ %s into %s", entry.repo, entry.revision, tmp)
        snapshot_download(entry.repo, revision=entry.revision, local_dir=tmp)
        origin = f"hub:{entry.repo}@{entry.revision}"
    checked = check_hashes(tmp, entry.sha256, name)
    problem = model_folder_problem(tmp, f"model {name} ({origin}):")
    if problem:
        raise ModelUnavailableError(problem)
    (tmp / "base_model.json").write_text(json.dumps({"name": name, "origin": origin, "sha256_checked": checked},
                                                    indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("model %s ready in %s (%s; %d file hashes checked)", name, out_dir, origin, len(checked))
    return out_dir


# ------------------------------------------------------------------------------ CPU smoke models
SMOKE_THINK_CHARS = 40  # how much of the reference solution the smoke SFT target keeps as "thinking"


def smoke_sft_target(record: dict) -> str:
    """A short Think-mode completion a tiny model can learn: the start of the reference solution as
    the thinking, then the boxed answer. The smoke needs SOME right answers (reward signal), not
    mathematical skill: RL prompts come from the same training set, so memorised answers score."""
    thought = " ".join(record.get("solution", "").split())[:SMOKE_THINK_CHARS]
    return f"<think>\n{thought}\n</think>\n\nThe final answer is $\\boxed{{{record['answer']}}}$."


def _random_init_and_sft(init, out_dir: Path, train_data: Path, thinking: bool) -> None:
    from transformers import AutoTokenizer

    from trace.tiny_qwen3 import copy_tokenizer, random_qwen3
    from trace.toy.sft import run_sft

    copy_tokenizer(init.tokenizer, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model, _ = random_qwen3(init.config, dict(init.size or {}), init.seed)
    records = [json.loads(line) for line in train_data.read_text().splitlines() if line.strip()]
    records = [{**r, "solution": smoke_sft_target(r)} for r in records]
    sft = init.sft
    run_sft(model, tokenizer, records, out_dir, steps=sft.steps, batch_size=min(sft.batch_size, len(records)),
            lr=sft.lr, warmup=sft.warmup, weight_decay=sft.weight_decay, thinking=thinking,
            seed=init.seed)
