"""The teacher check: is the self-teacher, given its private context, better than the student where
distillation acts? Measured before any RL, on a fixed batch of the base policy's own rollouts.

Self-distillation rests on one premise (TRACE.md §2–3): the same network, given a private context
(TRACE: the diagnostic label; SDPO / SRPO / RLSD: the reference solution), predicts the critical
tokens better than the student. If it cannot read that context (a model that never saw a system
turn, a template or prompt-rendering mistake), every distillation result measures a broken teacher,
silently: the per-entry clip scales each token's KL down to ~0.05, so the logged KL stays small
(issue 19: logged 0.04 while the real KL(q‖p) on span tokens was 8.8 nats).

On the batch (``teacher_check.n_prompts`` training prompts × ``train.group_size`` rollouts, the
trainer's sampling, grader and annotator ``train.annotator``), teacher q = the base given the private
context, student p = the base given the plain prompt (at step 0 synced, EMA and frozen teachers are
all the base), every number with a 95 % percentile-bootstrap CI over rollouts:

  first_error_correct   log q(c) − log p(c) of the CORRECT token c at the first error position of an
                        incorrect rollout (toy task: where the rollout first departs from the correct
                        chain, trace/toy/task.first_error_correction; real data has no such oracle)
  first_error_sampled   log q(w) − log p(w) of the sampled wrong token there (toy), or at the first
                        token of the annotated error span (real data): a good teacher lowers it
  first_error_margin    [log q(c) − log q(w)] − [log p(c) − log p(w)]; share_correct_up: Δ correct > 0
  key_span              log q(y) − log p(y) on key-span tokens of correct rollouts; share_key_q_above_p
  kl_span / kl_off_span the UNCLIPPED KL(q‖p) per token on annotated span tokens / elsewhere, beside
                        the clipped value the loss would use and the share of tokens the clip binds
  first_error_in_routed_span  share of first-error tokens inside the α-capped error span (the RKL branch
                        acts only there)
  accuracy              plain prompt vs the teacher's prompt (per problem: the private turn of its
                        first annotated rollout; G samples each), on the same problems

Verdict: ``better`` when the CI of first_error_correct lies above 0 (without a correct token:
first_error_sampled_relative = Δ of the sampled error token minus the rollout's mean Δ off the spans
below 0, since a context that flattens every prediction also lowers the error token), ``worse`` when it lies on the other side, else ``uninformative`` (too
few error positions, or a CI over 0). Training a distillation method refuses to start on ``worse``
(``teacher_check.on_worse: warn`` downgrades it to a loud warning; trace/cli.py).

The label job also saves this batch as the mechanism probe's fixed batch (trace/train/probe.py):
the same rollouts, first-error tokens and teacher-supported key tokens for every method.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from trace.annotate.setup import annotator_for
from trace.evaluation.metrics import bootstrap_ci
from trace.logprobs import completion_hidden_states
from trace.losses import DIVERGENCES, LOGP_FLOOR, entry_clip_scale
from trace.prompting import render_prompt, teacher_prompt
from trace.router import build_routed_masks
from trace.settings import TeacherGapJob, Validation, replace
from trace.train.distributed import rollout_options
from trace.train.probe import row_slices
from trace.train.trainer import Trainer
from trace.verify import grade_many

log = logging.getLogger(__name__)

STREAM = 900_000          # the batch's random stream, apart from training's and validation's
MIN_POSITIONS = 10        # fewer first-error positions than this: the verdict is 'uninformative'
CONTEXTS = ("label", "reference")


def summary(values: list[float], seed: int = 0) -> dict:
    """mean, 95 % percentile-bootstrap CI and n (None when there are no values)."""
    if not values:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    low, high = bootstrap_ci(values, seed=seed)
    return {"mean": sum(values) / len(values), "ci_low": low, "ci_high": high, "n": len(values)}


def verdict(stats: dict) -> tuple[str, str]:
    """('better' | 'worse' | 'uninformative', the statistic it rests on)."""
    correct, sampled = stats["first_error_correct"], stats["first_error_sampled_relative"]
    if correct["n"] >= MIN_POSITIONS:
        basis, good, bad = "first_error_correct", correct["ci_low"] > 0, correct["ci_high"] < 0
    elif sampled["n"] >= MIN_POSITIONS:  # no correct token known: a good teacher lowers the sampled error
        # more than it lowers the rollout's other tokens
        basis, good, bad = "first_error_sampled_relative", sampled["ci_high"] < 0, sampled["ci_low"] > 0
    else:
        return "uninformative", f"fewer than {MIN_POSITIONS} first-error positions"
    return ("better" if good else "worse" if bad else "uninformative"), basis


def check_teacher(gap_file: Path, method: str, on_worse: str) -> None:
    """Before a distillation run: refuse (ValueError, one line) or warn when its teacher check says the
    teacher is worse than the student at the first-error tokens."""
    gap = json.loads(Path(gap_file).read_text())
    line = (f"teacher check {gap_file}: the {gap['context']} teacher of {gap['model']} is {gap['verdict']} than "
            f"the student at first-error tokens ({gap['verdict_basis']}: {_fmt(gap[gap['verdict_basis']])})"
            if gap["verdict"] != "uninformative" else
            f"teacher check {gap_file}: uninformative ({gap['verdict_basis']})")
    if gap["verdict"] != "worse":
        log.info("%s", line)
        return
    if on_worse == "refuse":
        raise ValueError(f"{line}: {method} would distil from a teacher that cannot read its private context "
                         "(set teacher_check.on_worse: warn to train anyway)")
    log.warning("!!! %s: training %s anyway (teacher_check.on_worse: warn) !!!", line, method)


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:+.3f} [{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}], n={stat['n']}"


def _prompt_batch(tokenizer, texts: list[str], device):
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def score_tokens(model, tokenizer, student_prompts, teacher_prompts, completion_ids, completion_mask,
                 extra_ids, temperature: float, chunk: int, micro: int, entry_clip: float | None) -> dict:
    """Per completion token [B, T]: log p and log q of the sampled token and of ``extra_ids`` (a second
    token per position, −1 = none), the unclipped KL(q‖p) and the clipped one (the loss's FKL)."""
    device = completion_ids.device
    B, T = completion_ids.shape
    out = {name: torch.zeros(B, T) for name in ("p", "q", "p_extra", "q_extra", "kl", "kl_clipped", "clip_binds")}
    W = model.get_output_embeddings().weight
    for rows in row_slices(B, micro):
        ids, mask = completion_ids[rows], completion_mask[rows]
        where = mask.bool()
        hidden = {}
        for side, prompts in (("p", student_prompts[rows]), ("q", teacher_prompts[rows])):
            p_ids, p_mask = _prompt_batch(tokenizer, prompts, device)
            hidden[side] = completion_hidden_states(model, torch.cat([p_ids, ids], 1), torch.cat([p_mask, mask], 1),
                                                    p_ids.shape[1])[where]
        targets, extra = ids[where], extra_ids[rows][where]
        values = {name: [] for name in out}
        for part in row_slices(targets.shape[0], chunk):
            logp = (hidden["p"][part] @ W.T).float().div(temperature).log_softmax(-1).clamp(min=LOGP_FLOOR)
            logq = (hidden["q"][part] @ W.T).float().div(temperature).log_softmax(-1).clamp(min=LOGP_FLOOR)
            terms = DIVERGENCES["fkl"](logp, logq)
            kl = terms.sum(-1)
            scale = entry_clip_scale(terms, entry_clip) if entry_clip is not None else torch.ones_like(kl)
            e = extra[part].clamp(min=0).unsqueeze(-1)
            values["p"].append(logp.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1))
            values["q"].append(logq.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1))
            values["p_extra"].append(logp.gather(-1, e).squeeze(-1))
            values["q_extra"].append(logq.gather(-1, e).squeeze(-1))
            values["kl"].append(kl)
            values["kl_clipped"].append(kl * scale)
            values["clip_binds"].append((scale < 1).float())
        for name, parts in values.items():
            block = torch.zeros(ids.shape)
            block[where.cpu()] = torch.cat(parts).cpu() if parts else torch.zeros(0)
            out[name][rows] = block
    return out


def first_error_positions(tokenizer, records, rollouts, correct, error_mask, eos_id) -> list[tuple[int, int, int]]:
    """(row, position, correct token id or −1) of each incorrect rollout's first error token.

    Toy records: where the rollout first departs from the correct chain, with the correct token there.
    Other data: the first token of the annotated error span, correct token unknown (−1)."""
    from trace.annotate.offsets import completion_text_and_offsets
    from trace.toy.task import first_error_correction

    found = []
    for row, record in enumerate(records):
        if bool(correct[row]):
            continue
        length = int(rollouts.completion_mask[row].sum())
        ids = rollouts.completion_ids[row, :length].tolist()
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]
        if str(record.get("source", "")).startswith("toy/") and record.get("kind", "math") == "math":
            text, offsets = completion_text_and_offsets(tokenizer, ids)
            fix = first_error_correction(record.get("solution") or "", text)
            if fix is None:
                continue
            char, continuation = fix
            position = next((t for t, (a, b) in enumerate(offsets) if a <= char < b), None)
            if position is None:
                continue
            wanted = tokenizer(text[offsets[position][0]:char] + continuation, add_special_tokens=False)["input_ids"]
            if wanted and wanted[0] != ids[position]:
                found.append((row, position, int(wanted[0])))
        elif error_mask[row].any():
            found.append((row, int(error_mask[row].nonzero()[0]), -1))
    return found


def _per_rollout_means(values: torch.Tensor, where: torch.Tensor) -> list[float]:
    """The mean of ``values`` over each rollout's selected tokens (rollouts with none are skipped), so the
    bootstrap resamples rollouts, not correlated tokens."""
    counts = where.sum(1)
    sums = (values * where).sum(1)
    return [float(s / c) for s, c in zip(sums, counts) if c > 0]


def measure(trainer, context: str, n_prompts: int, seed: int) -> tuple[dict, dict]:
    """The statistics (module docstring) and the fixed probe batch, for one teacher context."""
    if context not in CONTEXTS:
        raise ValueError(f"teacher context must be one of {CONTEXTS}, got {context!r}")
    settings, tokenizer, G = trainer.settings, trainer.tokenizer, trainer.settings.group_size
    temperature, chunk, micro = settings.sampling.temperature, settings.logprob_chunk, settings.micro_batch_size
    started = time.time()
    if n_prompts > len(trainer.records):
        raise ValueError(f"teacher_check.n_prompts = {n_prompts} but the training data has {len(trainer.records)} "
                         "problems")
    problems = random.Random(f"teacher_gap:{seed}").sample(trainer.records, n_prompts)
    records = [r for r in problems for _ in range(G)]
    plain = [render_prompt(tokenizer, r, settings.thinking) for r in problems]
    torch.manual_seed(seed * 1_000_003 + STREAM)
    rollouts = trainer.engine.generate(trainer.policy, plain, G,
                                       **rollout_options(settings, trainer.dist, STREAM, 0, len(plain)))
    correct = torch.tensor(grade_many(rollouts.texts, [r["answer"] for r in records],
                                      [r.get("kind", "math") for r in records]))
    key, error, prefixes, annotation_stats = trainer.annotate(records, rollouts, correct.to(trainer.device))
    mask = rollouts.completion_mask.bool().cpu()
    capped = build_routed_masks("annotated", mask, correct, key.cpu(), error.cpu(), settings.kl.alpha)
    first_errors = first_error_positions(tokenizer, records, rollouts, correct, capped.error, trainer.engine.eos_id)
    extra = torch.full(mask.shape, -1, dtype=torch.long)
    for row, position, token in first_errors:
        extra[row, position] = token
    student_prompts = [render_prompt(tokenizer, r, settings.thinking) for r in records]
    teacher_prompts = [teacher_prompt(tokenizer, r, context, p, settings.thinking) for r, p in zip(records, prefixes)]
    scores = score_tokens(trainer.policy, tokenizer, student_prompts, teacher_prompts,
                          rollouts.completion_ids, rollouts.completion_mask, extra.to(rollouts.completion_ids.device),
                          temperature, chunk, micro, settings.kl.entry_clip)
    delta = scores["q"] - scores["p"]
    known = [(r, t) for r, t, c in first_errors if c >= 0]
    spans = (capped.key | capped.error) & mask
    off = mask & ~spans
    key_tokens = capped.key & mask & correct.bool().unsqueeze(1)
    stats = {
        "first_error_correct": summary([float(scores["q_extra"][r, t] - scores["p_extra"][r, t]) for r, t in known]),
        "first_error_sampled": summary([float(delta[r, t]) for r, t, _ in first_errors]),
        # the same, relative to the rollout's own tokens outside the spans: a context that merely flattens
        # every prediction lowers the sampled error token too, without knowing anything about it
        "first_error_sampled_relative": summary([float(delta[r, t] - delta[r][off[r]].mean())
                                                 for r, t, _ in first_errors if off[r].any()]),
        "first_error_margin": summary([float((scores["q_extra"][r, t] - scores["q"][r, t])
                                             - (scores["p_extra"][r, t] - scores["p"][r, t])) for r, t in known]),
        "share_correct_up": summary([float(scores["q_extra"][r, t] > scores["p_extra"][r, t]) for r, t in known]),
        "key_span": summary(_per_rollout_means(delta, key_tokens)),
        "share_key_q_above_p": summary(_per_rollout_means((delta > 0).float(), key_tokens)),
        "kl_span": summary(_per_rollout_means(scores["kl"], spans)),
        "kl_span_clipped": summary(_per_rollout_means(scores["kl_clipped"], spans)),
        "clip_binds_span": summary(_per_rollout_means(scores["clip_binds"], spans)),
        "kl_off_span": summary(_per_rollout_means(scores["kl"], mask & ~spans)),
        # does the KL channel reach the error at all? the α cap keeps a span's EARLIEST tokens, and in short
        # completions it can cut the wrong digit at a line's end out of the routed error span
        "first_error_in_routed_span": summary([float(capped.error[r, t]) for r, t, _ in first_errors]),
    }
    stats.update(_accuracy_with_teacher_prompt(trainer, problems, records, correct, teacher_prompts, prefixes,
                                               context, seed))
    stats["verdict"], stats["verdict_basis"] = verdict(stats)
    stats.update(context=context, n_problems=n_prompts, n_rollouts=len(records), rollout_accuracy=float(correct.float().mean()),
                 n_first_errors=len(first_errors), n_first_errors_with_correct_token=len(known),
                 annotator=settings.annotator.tier, annotation={k: v for k, v in annotation_stats.items()
                                                                   if isinstance(v, (int, float))},
                 wall_s=round(time.time() - started, 2))
    probe_batch = {"prompts": student_prompts, "completion_ids": rollouts.completion_ids.cpu(),
                   "completion_mask": rollouts.completion_mask.cpu(),
                   "first_errors": [(r, t, c, int(rollouts.completion_ids[r, t])) for r, t, c in first_errors if c >= 0],
                   "key_supported": (key_tokens & (delta > 0)), "spans": spans}
    return stats, probe_batch


@torch.no_grad()
def _accuracy_with_teacher_prompt(trainer, problems, records, correct, teacher_prompts, prefixes, context,
                                  seed) -> dict:
    """Accuracy from the plain prompt (the batch's rollouts) vs from the teacher's prompt, on the problems
    that have a private turn (label: an annotated rollout; reference: a reference solution)."""
    G = trainer.settings.group_size
    chosen, prompts = [], []
    for i in range(len(problems)):
        rows = range(i * G, (i + 1) * G)
        row = next((r for r in rows if context == "reference" or prefixes[r] is not None), None)
        if row is not None:
            chosen.append(i)
            prompts.append(teacher_prompts[row])
    if not chosen:
        return {"accuracy_plain": None, "accuracy_teacher_prompt": None, "accuracy_problems": 0}
    torch.manual_seed(seed * 1_000_003 + STREAM + 1)
    texts = trainer.engine.generate(trainer.policy, prompts, G,
                                    **rollout_options(trainer.settings, trainer.dist, STREAM + 1, 0, len(prompts))).texts
    grades = grade_many(texts, [problems[i]["answer"] for i in chosen for _ in range(G)],
                        [problems[i].get("kind", "math") for i in chosen for _ in range(G)])
    plain = [float(correct[i * G:(i + 1) * G].float().mean()) for i in chosen]
    taught = [sum(grades[n * G:(n + 1) * G]) / G for n in range(len(chosen))]
    return {"accuracy_plain": summary(plain), "accuracy_teacher_prompt": summary(taught),
            "accuracy_problems": len(chosen)}


def run_teacher_gap(job: TeacherGapJob, base_model: Path, train_path: Path, out_file: Path,
                    probe_batch_file: Path | None = None) -> dict:
    """The teacher check for one base model and teacher context: JSON to ``out_file`` (and, for the label
    context, the fixed probe batch to ``probe_batch_file``)."""
    job = TeacherGapJob.from_mapping(job)
    check, context = job.teacher_check, job.context
    # the base's own rollouts (GRPO: no teacher, nothing probed or validated), annotated as TRACE would be
    train = replace(job.train, method="grpo", probe={"steps": ()}, validation=Validation.from_mapping({}))
    if check.engine:
        train = replace(train, rollout={"engine": check.engine})
    out_file = Path(out_file)
    trainer = Trainer(train, Path(base_model), Path(train_path), out_file.parent / f"work-{context}")
    trainer.annotator = annotator_for(replace(train, method="trace_fkl"), Path(base_model), policy=trainer.policy,
                                      tokenizer=trainer.tokenizer, engine=trainer.engine)
    trainer.policy.eval()
    stats, probe_batch = measure(trainer, context, check.n_prompts, check.seed)
    stats["model"] = job.model or Path(base_model).name
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    if probe_batch_file is not None:
        torch.save(probe_batch, probe_batch_file)
    log.info("teacher check %s / %s: %s (%s); first-error Δ correct %s; key-span Δ %s; unclipped KL on spans %s "
             "(clipped %s)", stats["model"], context, stats["verdict"], stats["verdict_basis"],
             _fmt_or_none(stats["first_error_correct"]), _fmt_or_none(stats["key_span"]),
             _fmt_or_none(stats["kl_span"]), _fmt_or_none(stats["kl_span_clipped"]))
    return stats


def _fmt_or_none(stat: dict) -> str:
    return _fmt(stat) if stat["n"] else "n/a"
