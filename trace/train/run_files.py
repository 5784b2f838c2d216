"""A run's files: its folder layout (``RunDir``), and the JSONL records it reads, with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class RunDir:
    """Layout of one run: ``work/`` survives a killed job (Snakemake never deletes it)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.work = self.root / "work"
        self.checkpoint = self.work / "checkpoint"
        self.live_metrics = self.work / "metrics.jsonl"
        self.model = self.root / "model"
        self.metrics = self.root / "metrics.jsonl"
        self.best = self.work / "best"  # validation.select best: the best-on-validation policy so far
        self.last = self.work / "last"  # validation.select best: the last policy (model/ holds the best)

    @property
    def trainer_state(self) -> Path:
        return self.checkpoint / "trainer_state.pt"

    def load_trainer_state(self) -> dict:
        """The checkpoint's trainer state: tensors and plain types only (weights_only=True: a swapped
        file cannot run code)."""
        return self.load_checkpoint_part("trainer state",
                                         lambda: torch.load(self.trainer_state, weights_only=True), self.trainer_state)

    def load_checkpoint_part(self, what: str, load, path: Path):
        """load(), or one clear line naming the file and what to do (no traceback from a library)."""
        try:
            return load()
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable checkpoint
            detail = " ".join(str(exc).split())[:300]
            raise ValueError(f"checkpoint {what} {path} cannot be loaded ({type(exc).__name__}: {detail}); "
                             f"delete {self.work} to train this run from step 0") from None


def load_records(path: Path, what: str = "training data") -> list[dict]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path} does not exist (run the data rule first)")
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} {path} line {number} is not valid JSON ({exc.msg} at column "
                                 f"{exc.colno}; a truncated file?): rerun the data rule that writes it") from None
    return records


def require_model_folder(path: Path, what: str) -> None:
    """A local Hugging Face folder, or one clear error (not the hub's "Repo id must be in the form")."""
    if not (Path(path) / "config.json").is_file():
        problem = "does not exist" if not Path(path).exists() else "has no config.json"
        raise FileNotFoundError(f"{what} folder {path} {problem}: build it first (its Snakemake rule) "
                                "or fix the path")
