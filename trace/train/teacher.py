"""The teacher: a network scoring the student's exact completion tokens under its own prompt, with no
gradient.

Weights, by method: ``synced`` (a copy re-synced with the student every k steps; TRACE: 10),
``ema`` (SRPO: teacher ← (1 − rate)·teacher + rate·student), ``frozen`` (SDPO: the initial student),
all three the same network given a privileged prompt; ``external`` (OPD: a fixed, other model from
``train.teacher_model``, e.g. a larger base, on the student's own prompt). An external teacher must
share the student's tokenizer (load_external_teacher checks it); its hidden size may differ, since its
logits come from its own output layer.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from trace.losses import ema_update
from trace.logprobs import completion_hidden_states
from trace.schedule import teacher_sync_due
from trace.train.run_files import require_model_folder

TEACHER_MODES = ("synced", "ema", "frozen", "external")
# encoded by both tokenizers: same vocabulary is necessary, same ids for this text (digits, spaces, Unicode,
# the student's special tokens appended) catches a different pre-tokenizer or normaliser over it
PROBE_TEXT = "Let x = 12,345.6 and y = -7/8: compute  x·y²\n\t(≈ −10 802.4?) Ünïcödé 東京 🙂 <think>\n\n</think>"


class Teacher:
    def __init__(self, student, mode: str, sync_every: int = 10, ema_rate: float = 0.05):
        """``student``: the network to copy (synced / ema / frozen); for ``external`` the teacher model
        itself (load_external_teacher), used as is, without a copy."""
        if mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher mode {mode!r} (method.teacher): {' | '.join(TEACHER_MODES)}")
        self.mode, self.sync_every, self.ema_rate = mode, sync_every, ema_rate
        model = student if mode == "external" else copy.deepcopy(student)
        self.model = model.eval().requires_grad_(False)

    def update(self, student, step: int) -> None:
        """Called once per optimizer step, BEFORE the step's teacher forward (frozen, external: nothing)."""
        if self.mode == "synced" and teacher_sync_due(step, self.sync_every):
            self.model.load_state_dict(student.state_dict())
        elif self.mode == "ema" and step > 0:
            ema_update(self.model.parameters(), student.parameters(), self.ema_rate)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @torch.no_grad()
    def hidden_states(self, tokenizer, teacher_prompts: list[str], completion_ids, completion_mask):
        """[B, T, d] teacher hidden states predicting the student's completion tokens (d: the teacher's width)."""
        enc = tokenizer(teacher_prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                        padding_side="left").to(completion_ids.device)
        input_ids = torch.cat([enc["input_ids"], completion_ids], dim=1)
        attention = torch.cat([enc["attention_mask"], completion_mask], dim=1)
        return completion_hidden_states(self.model, input_ids, attention, enc["input_ids"].shape[1])


def tokenizer_mismatch(student_folder: Path | str, teacher_folder: Path | str) -> str | None:
    """What differs between two folders' tokenizers, in a few words; None when they give every token the
    same id (same vocabulary, added tokens included) and encode PROBE_TEXT to the same ids."""
    from transformers import AutoTokenizer

    student, teacher = (AutoTokenizer.from_pretrained(folder) for folder in (student_folder, teacher_folder))
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if len(ours) != len(theirs):
        return f"vocabularies of {len(ours)} vs {len(theirs)} tokens"
    other = sorted(token for token, index in ours.items() if theirs.get(token) != index)
    if other:
        return (f"{len(other)} of {len(ours)} tokens have other ids (e.g. {other[0]!r}: {ours[other[0]]} vs "
                f"{theirs.get(other[0])})")
    probe = PROBE_TEXT + "".join(student.all_special_tokens)
    ids = [tok(probe, add_special_tokens=False)["input_ids"] for tok in (student, teacher)]
    if ids[0] != ids[1]:
        return f"the same vocabulary, but a probe text encodes to other ids ({len(ids[0])} vs {len(ids[1])} tokens)"
    return None


def load_external_teacher(folder: Path | str, student_folder: Path | str, student_vocab_rows: int, dtype,
                          device) -> torch.nn.Module:
    """The external teacher of train.teacher_model, in eval mode; ValueError (one line naming both folders)
    unless it shares the student's tokenizer and its output layer covers the same vocabulary rows."""
    from transformers import AutoModelForCausalLM

    require_model_folder(Path(folder), "teacher model (train.teacher_model)")
    problem = tokenizer_mismatch(student_folder, folder)
    if problem:
        raise ValueError(f"train.teacher_model {folder} does not share the tokenizer of the student {student_folder}: "
                         f"{problem}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows != student_vocab_rows:
        raise ValueError(f"train.teacher_model {folder}: its output layer has {rows} vocabulary rows, the student "
                         f"{student_folder} {student_vocab_rows}: the logits must cover the same vocabulary")
    return model.eval()
