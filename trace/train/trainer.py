"""The training loop: one optimizer step of GRPO / TRACE / the self-distillation baselines.

Read ``train_step`` top to bottom; each paper concept is one named thing:
  rollouts  -> trace.rollout (engines: Hugging Face generate, or vLLM colocated; train.rollout)
  reward    -> trace.verify.grade_many (the same grader as evaluation)
  span annotator -> trace.annotate.setup.annotator_for (tiers: toy oracle, API, self, frozen, static)
  router    -> trace.router.build_routed_masks
  teacher   -> trace.train.teacher.Teacher (synced / EMA / frozen weights, privileged prompt)
  schedule  -> trace.schedule.LambdaSchedule (λ_k, ρ_k, when the teacher can be switched off)
  corner    -> trace.router.CORNERS (μ_E, μ_K)
  loss      -> trace.losses.trace_objective (Eq. 1) and the baselines' objectives
  validation -> Trainer.validate: mean@k on a held-out split every ``validation.every`` steps
  mechanism probe -> trace.train.probe (Fig 6 credit concentration, one-step log-prob lift)
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trace import losses
from trace.annotate.backends import AnnotationRequest
from trace.annotate.offsets import completion_text_and_offsets
from trace.evaluation.metrics import avg_at_k, bootstrap_ci, per_problem_accuracy
from trace.methods import MethodSpec, get_method
from trace.prompting import render_prompt
from trace.rollout import RolloutBatch, build_engine
from trace.router import CORNERS, RoutedMasks, build_routed_masks
from trace.schedule import LambdaSchedule
from trace.train.distributed import (Distributed, rollout_options, rollout_seed, seeds_per_rollout, token_budget_plan,
                                     trim_micro_batch)
from trace.train.logprobs import completion_hidden_states, gather_logprobs
from trace.train.probe import (fixed_batch_row, fixed_batch_scores, load_fixed_batch, probe_after_update,
                               probe_before_update)
from trace.train.teacher import Teacher, teacher_prompt
from trace.verify import grade_many

log = logging.getLogger(__name__)


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


VALIDATION_DEFAULTS = {"every": 0, "n_problems": None, "k": 4, "sampling": {}, "select": "last"}


class Trainer:
    def __init__(self, cfg: dict, base_model: Path, train_path: Path, run_dir: Path, annotator=None,
                 val_path: Path | None = None, engine=None, probe_batch: Path | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        require_model_folder(base_model, "base model (--base)")
        self.cfg, self.run = cfg, RunDir(run_dir)
        self.method: MethodSpec = get_method(cfg["method"])
        self.records = [r for r in load_records(train_path) if r.get("answer") not in (None, "")]
        self.dist = Distributed(cfg.get("device", "auto"))  # one plain process unless launched by torchrun
        self.device = self.dist.device
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        self.fingerprint = run_fingerprint(cfg, base_model)
        self.start_step = self._resume_step()
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        weights = self.run.checkpoint if self.start_step > 0 else base_model

        def load_policy():  # under torchrun: fp32 master weights, then sharded by prepare
            return AutoModelForCausalLM.from_pretrained(weights, dtype=self.dist.storage_dtype(dtype)).to(self.device)

        policy = (self.run.load_checkpoint_part("weights", load_policy, weights) if self.start_step > 0
                  else load_policy())
        self.policy = self.dist.prepare(policy, dtype, cfg.get("activation_checkpointing", False))
        self.policy.config.use_cache = True
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                                           weight_decay=cfg["weight_decay"])
        # engine=: an engine built elsewhere (tests share one vLLM engine); it first takes this policy's weights
        self.engine = engine or build_engine(cfg, self.tokenizer, weights, self.run.work)
        if engine is not None:
            engine.sync_weights(self.policy)
        kl = cfg["kl"]
        self.schedule = LambdaSchedule(self.method.schedule, kl["w0"], kl["warmup"], kl["end"])
        self.teacher = None
        if self.method.uses_teacher and self.schedule.teacher_forward_needed(self.start_step):
            # frozen = the initial student: load the base weights even when resuming. A sharded policy
            # cannot be copied: under torchrun the teacher loads the policy's weights file and is sharded too
            frozen = self.method.teacher == "frozen"
            source = (AutoModelForCausalLM.from_pretrained(base_model if frozen else weights,
                                                           dtype=self.dist.storage_dtype(dtype)).to(self.device)
                      if frozen or self.dist.active else self.policy)
            self.teacher = Teacher(source, self.method.teacher, kl["teacher_sync_every"], kl["ema_rate"])
            self.teacher.model = self.dist.prepare(self.teacher.model, dtype)
        # mechanism probe steps (train.probe.steps): the same for every method, annotated for every method
        self.probe_steps = {s for s in (cfg.get("probe") or {}).get("steps", []) if s >= self.start_step}
        # the teacher check's fixed batch: the same base rollouts probed for every method (probe.py)
        self.fixed_probe = (load_fixed_batch(probe_batch, self.tokenizer, self.device)
                            if probe_batch is not None and self.probe_steps else None)
        if annotator is None and ((self.method.needs_annotation and self.teacher is not None) or self.probe_steps):
            # the configured tier (train.annotator), built here: the self tier annotates with the live policy;
            # methods that route without spans get the tier TRACE would use, for the probe only
            from trace.annotate.setup import annotator_for

            as_trace = cfg if self.method.needs_annotation else {**cfg, "method": "trace_fkl"}
            annotator = annotator_for(as_trace, base_model, policy=self.policy, tokenizer=self.tokenizer,
                                      engine=self.engine)
            if annotator is None:
                raise ValueError(f"method {cfg['method']!r} routes on annotated spans: configure an annotator")
        self.annotator = annotator
        self.val_settings, self.val_records = validation_setup(cfg.get("validation") or {}, val_path)
        self.val_best = self._best_so_far()
        if self.start_step > 0:
            self._load_trainer_state()

    # ------------------------------------------------------------------ resumability
    def _resume_step(self) -> int:
        """Where to start: the checkpoint's next step if it belongs to THIS run (same settings and
        base weights; only ``steps`` / ``save_every`` may differ, to extend a run), else 0."""
        if not self.run.trainer_state.exists():
            return 0
        saved = self.run.load_trainer_state()
        if saved.get("fingerprint") != self.fingerprint:
            log.warning("ignoring the checkpoint in %s: it was written with other settings or base weights; "
                        "training from step 0", self.run.checkpoint)
            return 0
        return int(saved["next_step"])

    def _load_trainer_state(self) -> None:
        state = self.run.load_trainer_state()
        self.dist.load_optimizer(self.policy, self.optimizer, self.run.checkpoint, state)
        if self.teacher is not None and state.get("teacher") is not None:
            self.dist.load_model_state(self.teacher.model, state["teacher"])
        self.dist.barrier()  # every rank has read the checkpoint's metrics before rank 0 trims them
        if not self.dist.is_main:
            return
        kept = [ln for ln in self.run.live_metrics.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] < self.start_step] if self.run.live_metrics.exists() else []
        self.run.live_metrics.write_text("".join(ln + "\n" for ln in kept))
        log.info("resumed %s at step %d", self.run.root, self.start_step)

    def _save_checkpoint(self, next_step: int) -> None:
        """Atomic: write beside, then swap, so a kill mid-save keeps the previous checkpoint."""
        tmp = self.run.work / "checkpoint.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.dist.barrier()
        self.dist.save(self.policy, self.optimizer, tmp)  # under torchrun the optimizer state goes to DCP
        # synced and EMA teachers differ from the policy between syncs: a resume needs their weights
        # (frozen = the base weights, reloaded from the base folder)
        teacher_state = (self.dist.model_state(self.teacher.model)
                         if self.teacher is not None and self.teacher.mode in ("ema", "synced") else None)
        if self.dist.is_main:
            torch.save({"next_step": next_step, "teacher": teacher_state, "fingerprint": self.fingerprint,
                        "optimizer": None if self.dist.active else self.optimizer.state_dict()},
                       tmp / "trainer_state.pt")
            shutil.rmtree(self.run.checkpoint, ignore_errors=True)
            tmp.rename(self.run.checkpoint)
        self.dist.barrier()

    # ------------------------------------------------------------------ validation (Figs 3/4/7)
    def validation_due(self, step: int) -> bool:
        every = self.val_settings["every"]
        return bool(self.val_records) and ((step + 1) % every == 0 or step + 1 == self.cfg["steps"])

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """mean@k of the policy after step ``step``'s update on the first n validation problems:
        k samples per problem from the rollout engine, graded by the training reward's grader."""
        started, k = time.time(), self.val_settings["k"]
        engine = copy.copy(self.engine)  # the training engine; its sampling with validation's overrides
        engine.sampling = {**self.cfg["sampling"], **self.val_settings["sampling"]}
        stream = 500_000 + step  # apart from training's streams
        torch.manual_seed(self.cfg["seed"] * 1_000_003 + stream)
        per_rollout = seeds_per_rollout(self.cfg, self.dist)  # then any number of ranks draws the same samples
        mine = self.dist.share_padded(self.val_records)  # under torchrun each rank validates its share
        graded: dict[int, list[bool]] = {}
        for start in range(0, len(mine), self.cfg["batch_prompts"]):
            chunk = mine[start:start + self.cfg["batch_prompts"]]
            seeds = ([rollout_seed(self.cfg["seed"], stream, i or 0, j) for i, _ in chunk for j in range(k)]
                     if per_rollout else None)
            texts = engine.generate(self.policy, [render_prompt(self.tokenizer, r, self.cfg["thinking"])
                                                  for _, r in chunk], k, row_seeds=seeds, synced=self.dist.active).texts
            grades = grade_many(texts, [r["answer"] for _, r in chunk for _ in range(k)],
                                [r.get("kind", "math") for _, r in chunk for _ in range(k)])
            graded.update({i: grades[n * k:(n + 1) * k] for n, (i, _) in enumerate(chunk) if i is not None})
        self.dist.reshard(self.policy)
        merged = {i: g for part in self.dist.gather_objects(graded) for i, g in part.items()}
        correct = [merged[i] for i in range(len(self.val_records))]
        low, high = bootstrap_ci(per_problem_accuracy(correct))
        return {"val/mean_at_k": avg_at_k(correct), "val/ci95_low": low, "val/ci95_high": high, "val/k": k,
                "val/n_problems": len(correct), "val_s": round(time.time() - started, 3)}

    def _best_so_far(self) -> dict | None:
        """The best validated policy of THIS run (a fresh start forgets an earlier attempt's)."""
        if self.start_step == 0:
            shutil.rmtree(self.run.best, ignore_errors=True)
        info = self.run.best / "validation.json"
        return json.loads(info.read_text()) if info.exists() else None

    def _keep_if_best(self, step: int, row: dict) -> None:
        """validation.select best: save the policy when its score beats every earlier one (ties keep
        the earlier step), atomically like the checkpoint."""
        if self.val_best is not None and row["val/mean_at_k"] <= self.val_best["val/mean_at_k"]:
            return
        self.val_best = {"step": step, "val/mean_at_k": row["val/mean_at_k"]}  # the same on every rank
        tmp = self.run.work / "best.tmp"
        self._save_policy(tmp)
        if self.dist.is_main:
            (tmp / "validation.json").write_text(json.dumps(self.val_best) + "\n")
            shutil.rmtree(self.run.best, ignore_errors=True)
            tmp.rename(self.run.best)
        self.dist.barrier()

    # ------------------------------------------------------------------ one step
    def sample_prompts(self, step: int) -> list[dict]:
        """The step's prompts depend only on (seed, step), so a resumed run sees the same data."""
        rng = random.Random(f"{self.cfg['seed']}:{step}")
        return rng.sample(self.records, self.cfg["batch_prompts"])

    def annotate(self, records: list[dict], rollouts: RolloutBatch, correct: torch.Tensor):
        """Key/error token masks [B, T] and the teacher's label prefix per rollout."""
        B, T = rollouts.completion_ids.shape
        key = torch.zeros(B, T, dtype=torch.bool)
        error = torch.zeros(B, T, dtype=torch.bool)
        prefixes: list[str | None] = [None] * B
        requests, lengths = [], []
        for row, record in enumerate(records):
            length = int(rollouts.completion_mask[row].sum())
            ids = rollouts.completion_ids[row, :length].tolist()
            eos = bool(ids) and ids[-1] == self.engine.eos_id
            # the end-of-turn token decodes to text the annotator never sees: a zero-width token (never
            # marked) that still counts in |y|, so the annotator's cap and the router's are the same
            text, offsets = completion_text_and_offsets(self.tokenizer, ids[:-1] if eos else ids)
            offsets = list(offsets) + [(len(text), len(text))] * eos
            requests.append(AnnotationRequest(record["problem"], record.get("solution") or "", text,
                                              bool(correct[row]), offsets))
            lengths.append(length)
        results = self.annotator.annotate(requests)
        for row, (result, length) in enumerate(zip(results, lengths)):
            if result.token_mask is None or result.span_kind is None:
                continue
            target = key if result.span_kind == "key" else error
            target[row, :length] = torch.tensor(result.token_mask, dtype=torch.bool)
            prefixes[row] = result.teacher_prefix
        stats = self.dist.merge_stats(self.annotator.last_call_stats).as_dict()  # over all ranks' rollouts
        return key.to(self.device), error.to(self.device), prefixes, stats

    def route(self, step, records, rollouts, correct) -> tuple[RoutedMasks, list[str | None], dict]:
        mask = rollouts.completion_mask.bool()
        key = error = torch.zeros_like(mask)
        prefixes, stats = [None] * len(records), {}
        if self.method.needs_annotation:
            key, error, prefixes, stats = self.annotate(records, rollouts, correct)
        generator = torch.Generator().manual_seed(self.cfg["seed"] * 100_003 + step)
        alpha = self.cfg["kl"]["alpha"]
        routed = build_routed_masks(self.method.routing, mask.cpu(), correct.cpu(), key.cpu(), error.cpu(),
                                    alpha, generator)
        routed = RoutedMasks(routed.key.to(self.device), routed.error.to(self.device), routed.rest.to(self.device))
        return routed, prefixes, stats

    def train_step(self, step: int) -> dict:
        cfg, G = self.cfg, self.cfg["group_size"]
        started = time.time()
        torch.manual_seed(cfg["seed"] * 1_000_003 + step)

        # 1. rollouts from the current policy, G per prompt
        first, prompt_records = self.dist.share(self.sample_prompts(step))  # this rank's whole groups
        records = [r for r in prompt_records for _ in range(G)]
        prompts = [render_prompt(self.tokenizer, r, cfg["thinking"]) for r in prompt_records]
        rollouts = self.engine.generate(self.policy, prompts, G,
                                        **rollout_options(cfg, self.dist, step, first, len(prompts)))
        self.dist.reshard(self.policy)
        t_rollout = time.time() - started

        # 2. verifiable reward and group-normalised advantages
        correct = torch.tensor(grade_many(rollouts.texts, [r["answer"] for r in records],
                                          [r.get("kind", "math") for r in records]), device=self.device)
        rewards = correct.float()
        advantages = losses.ADVANTAGE_ESTIMATORS[cfg["advantage"]](rewards, G)

        # 3. λ_k and the teacher (skipped entirely once λ is 0 for good)
        lam = self.schedule(step)
        teacher_on = self.teacher is not None and self.schedule.teacher_forward_needed(step)
        if self.teacher is not None and not teacher_on:
            self.teacher = self.annotator = None  # frees their weights; pure GRPO from here on
            gc.collect()
        if teacher_on:
            self.dist.reshard(self.teacher.model)
            self.teacher.update(self.policy, step)

        # (probe steps only: annotate and score the rollouts before the update; TRACE.md §7 mechanisms)
        probe = fixed_before = None
        if step in self.probe_steps and self.fixed_probe is not None:  # needs no annotator: every probe step
            fixed_before = fixed_batch_scores(self, self.fixed_probe)
        if step in self.probe_steps:
            if self.annotator is None:
                log.warning("probe step %d skipped: the annotator was freed when λ reached 0", step)
            else:
                probe = probe_before_update(self, records, rollouts, correct)

        # 4. span annotation + router: which tokens get a KL channel
        routed, label_prefixes, annotation_stats = (self.route(step, records, rollouts, correct) if teacher_on
                                                    else (None, None, {}))
        teacher_prompts = None
        if teacher_on:
            teacher_prompts = [teacher_prompt(self.tokenizer, r, self.method.teacher_context, p, cfg["thinking"])
                               for r, p in zip(records, label_prefixes)]

        # 5. loss over micro-batches with global normalisers, one optimizer step
        mask = rollouts.completion_mask.bool()
        counts, agg = self.aggregation(mask)
        srpo_weight_mean = (self._srpo_global_weight_mean(rollouts, correct, teacher_prompts)
                            if teacher_on and self.method.objective == "srpo" else None)
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        plan = (token_budget_plan(rollouts, cfg["micro_batch_tokens"], cfg["micro_batch_size"], self.dist)
                if cfg.get("micro_batch_tokens") else _micro_batches(len(records), cfg["micro_batch_size"]))
        for rows in plan:
            batch = (rows, rollouts, advantages, correct, routed, teacher_prompts)
            if cfg.get("micro_batch_tokens"):
                batch = trim_micro_batch(*batch)  # its own padded width: the budget bounds the real work
            metrics = self._micro_batch_loss(*batch, lam, step, agg, srpo_weight_mean)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg["grad_clip"])
        self.optimizer.step()
        self.engine.sync_weights(self.policy)  # the next rollouts (and the self annotator) use the new weights

        sums = self.dist.sum_floats(sums)  # every rank's micro-batches (identity in one process)
        n_tokens = float(counts["global_tokens"])
        row = {
            "step": step,
            "reward_mean": self.dist.mean(rewards.mean().item()),
            "accuracy": self.dist.mean(correct.float().mean().item()),
            "entropy": sums.pop("entropy_sum") / n_tokens,
            "response_length": n_tokens / (len(records) * self.dist.world_size),
            "clip_frac_high": sums.pop("clipped_high") / n_tokens,
            "clip_frac_low": sums.pop("clipped_low") / n_tokens,
            "grad_norm": self.dist.grad_norm(grad_norm),
            "loss": sums.pop("loss"),
            "lambda": lam,
            "rho": self.schedule.rho(step) if self.method.objective == "trace" else 1.0,
            "teacher_active": int(teacher_on),
            "groups_with_signal": self.dist.mean(float((rewards.view(-1, G).std(dim=1) > 0).float().mean())),
            "rollout_s": round(t_rollout, 3),
            "step_s": round(time.time() - started, 3),
        }
        if routed is not None:
            row.update(tokens_key=float(self.dist.sum(routed.key.sum())),
                       tokens_error=float(self.dist.sum(routed.error.sum())),
                       span_coverage=float(self.dist.sum((routed.key | routed.error).sum())) / n_tokens)
        for name in [n.removesuffix("_tokens") for n in sums if n.endswith("_tokens")]:
            # per routed token over the whole batch (teacher entropy, KL per class), not per micro-batch
            row[name] = sums.pop(f"{name}_sum") / max(sums.pop(f"{name}_tokens"), 1.0)
        if srpo_weight_mean is not None:  # a global mean: logged once, not summed over micro-batches
            row["srpo_weight_raw_mean"] = float(srpo_weight_mean)
        row.update({name: value for name, value in sums.items()})
        row.update({k: v for k, v in annotation_stats.items() if isinstance(v, (int, float))})
        if probe is not None:
            row.update(probe_after_update(self, rollouts, probe))
        if fixed_before is not None:
            row.update(fixed_batch_row(fixed_before, fixed_batch_scores(self, self.fixed_probe), self.fixed_probe))
        return row

    def aggregation(self, mask: torch.Tensor) -> tuple[dict, dict]:
        """Token counts of the WHOLE optimizer batch, and the aggregation arguments built on them
        that every micro-batch's loss is normalised by (never per micro-batch)."""
        counts = {name: self.dist.sum(count) for name, count in losses.count_normalizers(mask).items()}  # all ranks
        return counts, dict(agg_mode=self.cfg["agg_mode"], global_tokens=counts["global_tokens"],
                            global_seqs=counts["global_seqs"], max_len=self.cfg["sampling"]["max_new_tokens"])

    @torch.no_grad()
    def _srpo_global_weight_mean(self, rollouts, correct, teacher_prompts) -> torch.Tensor:
        """mean of exp(−β·H_teacher) over ALL failed-rollout tokens of the optimizer batch.

        SRPO normalises its entropy-aware weights to mean 1; doing that per micro-batch would make
        the loss depend on how the batch is split (TRACE.md §8). This costs one extra no-grad teacher
        forward per step, for SRPO only.
        """
        total, count = torch.zeros((), device=self.device), 0
        temperature, chunk = self.cfg["sampling"]["temperature"], self.cfg["logprob_chunk"]
        for rows in _micro_batches(len(teacher_prompts), self.cfg["micro_batch_size"]):
            failed = rollouts.completion_mask[rows].bool() & ~correct[rows].bool().unsqueeze(-1)
            if not failed.any() and not self.dist.active:  # every rank must run the sharded teacher alike
                continue
            hidden = self.teacher.hidden_states(self.tokenizer, [teacher_prompts[i] for i in rows],
                                                rollouts.completion_ids[rows], rollouts.completion_mask[rows])
            entropy = losses.chunked_entropy(hidden[failed], self.teacher.lm_head_weight, chunk, temperature)
            total += torch.exp(-self.cfg["kl"]["srpo_entropy_beta"] * entropy.float()).sum()
            count += int(failed.sum())
        return self.dist.sum(total) / max(int(self.dist.sum(torch.tensor(count, device=self.device))), 1)

    def _micro_batch_loss(self, rows, rollouts, advantages, correct, routed, teacher_prompts, lam, step,
                          agg, srpo_weight_mean) -> dict[str, float]:
        cfg, kl, method = self.cfg, self.cfg["kl"], self.method
        temperature = cfg["sampling"]["temperature"]
        mask = rollouts.completion_mask[rows].bool()
        targets = rollouts.completion_ids[rows]
        W = self.policy.get_output_embeddings().weight
        hidden = completion_hidden_states(self.policy, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                                          rollouts.prompt_ids.shape[1])
        logp_flat, entropy_flat = gather_logprobs(hidden[mask], W, targets[mask], temperature, cfg["logprob_chunk"])
        logp = losses.tokens_from_positions(logp_flat, mask)
        old_logp = logp.detach()  # one update per batch (mini-batch = batch, as in the paper)
        adv = advantages[rows]

        teacher_hidden = None
        if teacher_prompts is not None:
            teacher_hidden = self.teacher.hidden_states(self.tokenizer, [teacher_prompts[i] for i in rows],
                                                        targets, rollouts.completion_mask[rows])
        metrics: dict[str, float] = {}
        if method.objective == "rlsd" and teacher_hidden is not None:
            t_logp_flat, _ = gather_logprobs(teacher_hidden[mask], self.teacher.lm_head_weight, targets[mask],
                                             temperature, cfg["logprob_chunk"])
            adv = losses.rlsd_token_advantages(adv, logp.detach(), losses.tokens_from_positions(t_logp_flat, mask),
                                               strength=self.schedule.strength(step), eps_w=kl["rlsd_eps_w"])
        ppo, clip = losses.ppo_clip_per_token(logp, old_logp, adv, cfg["eps_low"], cfg["eps_high"],
                                              cfg.get("dual_clip_c"), mask=mask)

        def divergence(where: torch.Tensor, kind: str, name: str, **extra) -> torch.Tensor:
            """Per-token divergence at the routed positions only (zeros elsewhere). Logs, per routed token
            over the WHOLE batch (sums and counts here, divided in train_step): the clipped value the loss
            uses (kl/<name>_token_mean), the unclipped one (…_unclipped_token_mean) and the share of tokens
            whose value the per-entry clip scaled down (…_clip_binds_frac)."""
            values, scale = losses.chunked_divergence(
                hidden[where], teacher_hidden[where], W, kind, chunk_size=cfg["logprob_chunk"],
                teacher_lm_head_weight=self.teacher.lm_head_weight, top_k=kl["top_k"],
                tail_bucket=kl["tail_bucket"], entry_clip=kl["entry_clip"], temperature=temperature,
                return_scale=True, **extra)
            n = float(values.numel())
            for metric, total in (("token_mean", values.detach()), ("unclipped_token_mean", values.detach() / scale),
                                  ("clip_binds_frac", (scale < 1).float())):
                metrics[f"kl/{name}_{metric}_sum"] = float(total.sum())
                metrics[f"kl/{name}_{metric}_tokens"] = n
            return losses.tokens_from_positions(values, where)

        if method.objective == "trace" and teacher_hidden is not None:
            sub = RoutedMasks(routed.key[rows], routed.error[rows], routed.rest[rows])
            mu_E, mu_K = CORNERS[method.corner]
            fkl = divergence(sub.key, "fkl", "fkl_key") if (lam and mu_K) else None
            rkl = divergence(sub.error, "rkl", "rkl_error") if (lam and mu_E) else None
            loss, parts = losses.trace_objective(
                ppo, mask, sub.key, sub.error, fkl, rkl, lam=lam, w0=kl["w0"], mu_E=mu_E, mu_K=mu_K,
                full_grpo_on_spans_without_kl=kl["full_grpo_on_spans_without_kl"], **agg)
            metrics.update({f"kl/{k}": float(v) for k, v in parts.items() if k in ("kl_key_branch", "kl_error_branch")})
            for name, values in (("fkl_key", fkl), ("rkl_error", rkl)):
                if values is None:  # no KL this step on this class: logged as 0 (λ = 0 or the corner's μ = 0)
                    metrics[f"kl/{name}_token_mean_sum"] = metrics[f"kl/{name}_token_mean_tokens"] = 0.0
        elif method.objective == "sdpo" and teacher_hidden is not None:
            jsd = divergence(mask, "jsd", "distill", beta=kl["jsd_beta"])
            loss, parts = losses.sdpo_objective(ppo, mask, jsd, distillation_weight=kl["sdpo_distillation_weight"], **agg)
            metrics["kl/distill"] = float(parts["distill"])
        elif method.objective == "srpo" and teacher_hidden is not None:
            failed = mask & ~correct[rows].bool().unsqueeze(-1)
            jsd = divergence(failed, "jsd", "distill", beta=kl["jsd_beta"])
            teacher_entropy = losses.tokens_from_positions(
                losses.chunked_entropy(teacher_hidden[failed], self.teacher.lm_head_weight, cfg["logprob_chunk"],
                                       temperature), failed)
            loss, parts = losses.srpo_objective(ppo, mask, jsd, correct[rows], teacher_entropy,
                                                entropy_beta=kl["srpo_entropy_beta"],
                                                weight_global_mean=srpo_weight_mean, **agg)
            metrics["kl/distill"] = float(parts["distill"])
            if failed.any():
                metrics.update(teacher_entropy_sum=float(teacher_entropy[failed].sum()),
                               teacher_entropy_tokens=float(failed.sum()))
        else:
            loss = losses.aggregate(ppo, mask, agg["agg_mode"], agg["global_tokens"], agg["global_seqs"], agg["max_len"])
        if teacher_hidden is not None and method.objective != "srpo":
            span = mask if routed is None else (routed.key[rows] | routed.error[rows])
            if span.any():
                metrics.update(teacher_entropy_sum=float(losses.chunked_entropy(
                    teacher_hidden[span], self.teacher.lm_head_weight, cfg["logprob_chunk"], temperature).sum()),
                    teacher_entropy_tokens=float(span.sum()))
        loss.backward()
        if rollouts.sampled_logprobs is not None:
            # the rollout engine's log-prob of its own samples vs the trainer's (verl's rollout_probs_diff):
            # ~1e-6 when vLLM samples untruncated (top-k and top-p off), −log(kept mass) with truncation
            gap = (logp.detach() - rollouts.sampled_logprobs[rows].to(logp.dtype)).abs()[mask]
            metrics.update(rollout_logprob_gap_sum=float(gap.sum()), rollout_logprob_gap_tokens=float(gap.numel()))
        metrics.update(loss=float(loss.detach()), entropy_sum=float(entropy_flat.sum()),
                       clipped_high=float((clip["clipped_high"] & mask).sum()),
                       clipped_low=float((clip["clipped_low"] & mask).sum()))
        return metrics

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        cfg = self.cfg
        self.run.work.mkdir(parents=True, exist_ok=True)
        steps = range(self.start_step, cfg["steps"])
        # a fresh start drops rows of an earlier attempt (killed before its first checkpoint)
        # rank 0 writes the metrics (they are global) and the attempt log
        attempt = (_attempt_log(self.run, self.start_step, cfg["steps"]) if self.dist.is_main
                   else contextlib.nullcontext())
        with attempt, open(self.run.live_metrics if self.dist.is_main else os.devnull,
                           "a" if self.start_step > 0 else "w") as live:
            for step in tqdm(steps, desc=f"{cfg['method']} seed{cfg['seed']}", initial=self.start_step,
                             total=cfg["steps"], mininterval=10, disable=not self.dist.is_main):
                row = self.train_step(step)
                if self.validation_due(step):
                    row.update(self.validate(step))
                    log.info("step %d val mean@%d %.4f", step, row["val/k"], row["val/mean_at_k"])
                    if self.val_settings["select"] == "best":
                        self._keep_if_best(step, row)
                live.write(json.dumps(row) + "\n")
                live.flush()
                log.info("step %d reward %.3f entropy %.3f len %.1f λ %.3f (%.1fs)", step, row["reward_mean"],
                         row["entropy"], row["response_length"], row["lambda"], row["step_s"])
                # the final step too: raising train.steps later continues from here, repeating nothing
                if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["steps"]:
                    self._save_checkpoint(step + 1)
        self._save_output_model()
        if self.dist.is_main:
            shutil.copyfile(self.run.live_metrics, self.run.metrics)
        self.dist.barrier()
        return self.run.model

    def _save_policy(self, folder: Path) -> None:
        """The policy in train.dtype (under torchrun gathered from the fp32 master shards) and the tokenizer
        as a fresh Hugging Face folder, written by rank 0."""
        if self.dist.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        self.dist.barrier()
        self.dist.save(self.policy, None, folder, dtype=getattr(torch, self.cfg.get("dtype", "float32")))
        if self.dist.is_main:
            self.tokenizer.save_pretrained(folder)

    def _save_output_model(self) -> None:
        """model/ = the last policy, or (validation.select best) the best-on-validation one, with the
        last kept in work/last."""
        if self.val_settings["select"] != "best":
            self._save_policy(self.run.model)
            return
        self._save_policy(self.run.last)
        if self.dist.is_main:
            shutil.rmtree(self.run.model, ignore_errors=True)
            shutil.copytree(self.run.best, self.run.model)
            log.info("model/ = the best-on-validation policy: %s", self.val_best)


def validation_setup(settings: dict, val_path: Path | None) -> tuple[dict, list[dict]]:
    """train.validation merged over its defaults, and the first n_problems validation records
    (none when validation is off or no file was given)."""
    unknown = set(settings) - set(VALIDATION_DEFAULTS)
    if unknown:
        raise ValueError(f"train.validation: unknown keys {sorted(unknown)}; known: {sorted(VALIDATION_DEFAULTS)}")
    settings = {**VALIDATION_DEFAULTS, **settings}
    if settings["select"] not in ("last", "best"):
        raise ValueError(f"train.validation.select must be 'last' or 'best', got {settings['select']!r}")
    if settings["every"] < 0 or settings["k"] < 1:
        raise ValueError(f"train.validation: need every >= 0 and k >= 1, got {settings['every']} and {settings['k']}")
    if settings["every"] == 0 or val_path is None:
        if settings["select"] == "best":
            raise ValueError("train.validation.select is 'best' but validation is off "
                             f"({'no --val-data file' if val_path is None else 'every: 0'})")
        if settings["every"] > 0:
            log.warning("train.validation.every is %d but no --val-data file was given: no validation",
                        settings["every"])
        return settings, []
    records = [r for r in load_records(val_path, "validation data") if r.get("answer") not in (None, "")]
    records = records[:settings["n_problems"]] if settings["n_problems"] else records
    if not records:
        raise ValueError(f"validation file {val_path} has no problems with an answer")
    return settings, records


@contextlib.contextmanager
def _attempt_log(run: RunDir, start_step: int, steps: int):
    """While training, the package's log lines also go to work/train.log, APPENDED: a rerun keeps what
    the killed attempt said (the rule's own log file is rewritten by each job)."""
    handler = logging.FileHandler(run.work / "train.log", mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("trace")
    level = package.level
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    log.info("attempt started at step %d of %d (%s)", start_step, steps, run.root)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()


def run_fingerprint(cfg: dict, base_model: Path) -> str:
    """The run's settings (minus the step budget, checkpoint period and how the job is laid out over
    processes: a checkpoint resumes under another world size) and its base weights."""
    from trace.annotate.local import weights_fingerprint

    layout = ("steps", "save_every", "parallel", "activation_checkpointing")
    settings = {k: v for k, v in cfg.items() if k not in layout}
    text = json.dumps(settings, sort_keys=True, default=str) + weights_fingerprint(base_model)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
