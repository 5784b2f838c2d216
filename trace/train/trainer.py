"""The training loop: one optimizer step of GRPO / TRACE / the self-distillation baselines.

Read ``train_step`` top to bottom; each paper concept is one named thing:
  rollouts  -> trace.rollout (engines: Hugging Face generate, or vLLM colocated; train.rollout); who samples:
               trace.rollout.behaviour (the student, or a teacher-leaning behaviour policy: MethodSpec.rollout_policy)
  reward    -> trace.verify.grade_many (the same grader as evaluation)
  span annotator -> trace.annotate.setup.annotator_for (tiers: toy oracle, API, self, frozen, static)
  router    -> trace.router.build_routed_masks
  teacher   -> trace.train.teacher.Teacher (synced / EMA / frozen weights, privileged prompt)
  schedule  -> trace.schedule.LambdaSchedule (λ_k, ρ_k, when the teacher can be switched off)
  corner    -> trace.router.CORNERS (μ_E, μ_K)
  loss      -> trace.losses.trace_objective (Eq. 1) and the baselines' objectives
  objective -> trace.train.objectives.OBJECTIVES (per MethodSpec.objective; GRPO once the teacher is off)
  validation -> trace.train.validation.HeldOutValidation: mean@k on a held-out split every ``validation.every`` steps
  mechanism probe -> trace.train.probe (Fig 6 credit concentration, one-step log-prob lift)
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm

from trace import losses
from trace.annotate.backends import AnnotationRequest
from trace.annotate.offsets import completion_text_and_offsets
from trace.annotate.setup import annotator_for
from trace.logprobs import completion_hidden_states, gather_logprobs
from trace.methods import MethodSpec, get_method
from trace.prompting import render_prompt, teacher_prompt
from trace.rollout import RolloutBatch, build_engine
from trace.rollout.behaviour import rollout_policy_for
from trace.router import RoutedMasks, build_routed_masks
from trace.schedule import LambdaSchedule
from trace.settings import TrainRun, replace
from trace.train.distributed import Distributed, rollout_options, token_budget_plan, trim_micro_batch
from trace.train.objectives import MicroBatch, objective_for
from trace.train.probe import (ProbedPolicy, fixed_batch_row, fixed_batch_scores, load_fixed_batch,
                               probe_after_update, probe_before_update)
from trace.train.run_files import RunDir, load_records, require_model_folder
from trace.train.teacher import Teacher, load_external_teacher
from trace.train.validation import HeldOutValidation
from trace.verify import grade_many

log = logging.getLogger(__name__)


Reward = Callable[[list[str], list[str], list[str]], list[bool]]  # (texts, answers, kinds) -> correct


class Trainer:
    """One RL run. ``settings``: the run's TrainRun (a mapping is checked and typed once, here);
    ``reward``: the verifiable reward (the evaluation's grader unless a caller, e.g. the bench, brings its own)."""

    def __init__(self, settings: TrainRun | Mapping, base_model: Path, train_path: Path, run_dir: Path,
                 annotator=None, val_path: Path | None = None, engine=None, probe_batch: Path | None = None,
                 reward: Reward = grade_many):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        require_model_folder(base_model, "base model (--base)")
        settings = TrainRun.from_mapping(settings)
        self.settings, self.run, self.reward = settings, RunDir(run_dir), reward
        self.method: MethodSpec = get_method(settings.method)
        self.records = [r for r in load_records(train_path) if r.get("answer") not in (None, "")]
        self.dist = Distributed(settings.device)  # one plain process unless launched by torchrun
        self.device = self.dist.device
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        if self.method.teacher == "external":
            if settings.teacher_model is None:
                raise ValueError(f"method {settings.method!r} distils from an external teacher: set "
                                 "train.teacher_model (a model folder with the student's tokenizer)")
            require_model_folder(Path(settings.teacher_model), "teacher model (train.teacher_model)")
        self.fingerprint = run_fingerprint(settings, base_model)
        self.start_step = self._resume_step()
        dtype = getattr(torch, settings.dtype)
        weights = self.run.checkpoint if self.start_step > 0 else base_model

        def load_policy():  # under torchrun: fp32 master weights, then sharded by prepare
            return AutoModelForCausalLM.from_pretrained(weights, dtype=self.dist.storage_dtype(dtype)).to(self.device)

        policy = (self.run.load_checkpoint_part("weights", load_policy, weights) if self.start_step > 0
                  else load_policy())
        self.policy = self.dist.prepare(policy, dtype, settings.activation_checkpointing)
        self.policy.config.use_cache = True
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=settings.lr, betas=tuple(settings.adam_betas),
                                           weight_decay=settings.weight_decay)
        # engine=: an engine built elsewhere (tests share one vLLM engine); it first takes this policy's weights
        self.engine = engine or build_engine(settings, self.tokenizer, weights, self.run.work)
        if engine is not None:
            engine.sync_weights(self.policy)
        self.rollout_policy = rollout_policy_for(self.method.rollout_policy, settings, self.engine)
        kl = settings.kl
        self.schedule = LambdaSchedule(self.method.schedule, kl.w0, kl.warmup, kl.end)
        self.teacher = None
        if self.method.uses_teacher and self.schedule.teacher_forward_needed(self.start_step):
            # frozen = the initial student: load the base weights even when resuming. A sharded policy
            # cannot be copied: under torchrun the teacher loads the policy's weights file and is sharded too.
            # external = another model (train.teacher_model), checked to share the student's tokenizer
            frozen = self.method.teacher == "frozen"
            if self.method.teacher == "external":
                source = load_external_teacher(Path(settings.teacher_model), base_model,
                                               self.policy.get_output_embeddings().weight.shape[0],
                                               self.dist.storage_dtype(dtype), self.device)
            else:
                source = (AutoModelForCausalLM.from_pretrained(base_model if frozen else weights,
                                                               dtype=self.dist.storage_dtype(dtype)).to(self.device)
                          if frozen or self.dist.active else self.policy)
            self.teacher = Teacher(source, self.method.teacher, kl.teacher_sync_every, kl.ema_rate)
            self.teacher.model = self.dist.prepare(self.teacher.model, dtype)
        # mechanism probe steps (train.probe.steps): the same for every method, annotated for every method
        self.probe_steps = {s for s in settings.probe.steps if s >= self.start_step}
        # the teacher check's fixed batch: the same base rollouts probed for every method (probe.py)
        self.fixed_probe = (load_fixed_batch(probe_batch, self.tokenizer, self.device)
                            if probe_batch is not None and self.probe_steps else None)
        if annotator is None and ((self.method.needs_annotation and self.teacher is not None) or self.probe_steps):
            # the configured tier (train.annotator), built here: the self tier annotates with the live policy;
            # methods that route without spans get the tier TRACE would use, for the probe only
            as_trace = settings if self.method.needs_annotation else replace(settings, method="trace_fkl")
            annotator = annotator_for(as_trace, base_model, policy=self.policy, tokenizer=self.tokenizer,
                                      engine=self.engine)
            if annotator is None:
                raise ValueError(f"method {settings.method!r} routes on annotated spans: configure an annotator")
        self.annotator = annotator
        self.validation = HeldOutValidation(settings, val_path, self.run, self.start_step, reward)
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
        # (frozen = the base weights, reloaded from the base folder; external = train.teacher_model, reloaded)
        teacher_state = (self.dist.model_state(self.teacher.model)
                         if self.teacher is not None and self.teacher.mode in ("ema", "synced") else None)
        if self.dist.is_main:
            torch.save({"next_step": next_step, "teacher": teacher_state, "fingerprint": self.fingerprint,
                        "optimizer": None if self.dist.active else self.optimizer.state_dict()},
                       tmp / "trainer_state.pt")
            shutil.rmtree(self.run.checkpoint, ignore_errors=True)
            tmp.rename(self.run.checkpoint)
        self.dist.barrier()

    # ------------------------------------------------------------------ one step
    def sample_prompts(self, step: int) -> list[dict]:
        """The step's prompts depend only on (seed, step), so a resumed run sees the same data."""
        rng = random.Random(f"{self.settings.seed}:{step}")
        return rng.sample(self.records, self.settings.batch_prompts)

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
        generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + step)
        alpha = self.settings.kl.alpha
        routed = build_routed_masks(self.method.routing, mask.cpu(), correct.cpu(), key.cpu(), error.cpu(),
                                    alpha, generator)
        routed = RoutedMasks(routed.key.to(self.device), routed.error.to(self.device), routed.rest.to(self.device))
        return routed, prefixes, stats

    def train_step(self, step: int) -> dict:
        settings, G = self.settings, self.settings.group_size
        started = time.time()
        torch.manual_seed(settings.seed * 1_000_003 + step)

        # 1. rollouts from the current policy, G per prompt
        first, prompt_records = self.dist.share(self.sample_prompts(step))  # this rank's whole groups
        records = [r for r in prompt_records for _ in range(G)]
        prompts = [render_prompt(self.tokenizer, r, settings.thinking) for r in prompt_records]
        # (by the method's rollout policy: the student, or a behaviour policy leaning on the teacher)
        teacher_model = None if self.teacher is None else self.teacher.model
        rollouts, rollout_sums = self.rollout_policy(step, self.policy, teacher_model, prompts, G,
                                                     **rollout_options(settings, self.dist, step, first, len(prompts)))
        self.dist.reshard(self.policy)
        t_rollout = time.time() - started

        # 2. verifiable reward and group-normalised advantages
        correct = torch.tensor(self.reward(rollouts.texts, [r["answer"] for r in records],
                                           [r.get("kind", "math") for r in records]), device=self.device)
        rewards = correct.float()
        advantages = losses.ADVANTAGE_ESTIMATORS[settings.advantage](rewards, G)

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
        probed = ProbedPolicy.of(self.settings, self.policy, self.tokenizer, self.dist)
        if step in self.probe_steps and self.fixed_probe is not None:  # needs no annotator: every probe step
            fixed_before = fixed_batch_scores(probed, self.fixed_probe)
        if step in self.probe_steps:
            if self.annotator is None:
                log.warning("probe step %d skipped: the annotator was freed when λ reached 0", step)
            else:
                key, error, prefixes, _ = self.annotate(records, rollouts, correct)
                probe = probe_before_update(probed, records, rollouts, correct, key, error, prefixes)

        # 4. span annotation + router: which tokens get a KL channel
        routed, label_prefixes, annotation_stats = (self.route(step, records, rollouts, correct) if teacher_on
                                                    else (None, None, {}))
        teacher_prompts = None
        if teacher_on:
            teacher_prompts = [teacher_prompt(self.tokenizer, r, self.method.teacher_context, p, settings.thinking)
                               for r, p in zip(records, label_prefixes)]

        # 5. loss over micro-batches with global normalisers, one optimizer step
        mask = rollouts.completion_mask.bool()
        counts, agg = self.aggregation(mask)
        srpo_weight_mean = (self._srpo_global_weight_mean(rollouts, correct, teacher_prompts)
                            if teacher_on and self.method.objective == "srpo" else None)
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = dict(rollout_sums)
        plan = (token_budget_plan(rollouts, settings.micro_batch_tokens, settings.micro_batch_size, self.dist)
                if settings.micro_batch_tokens else _micro_batches(len(records), settings.micro_batch_size))
        for rows in plan:
            batch = (rows, rollouts, advantages, correct, routed, teacher_prompts)
            if settings.micro_batch_tokens:
                batch = trim_micro_batch(*batch)  # its own padded width: the budget bounds the real work
            metrics = self.micro_batch_loss(*batch, lam, step, agg, srpo_weight_mean)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), settings.grad_clip)
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
            **self.rollout_policy.step_values(step),
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
            row.update(probe_after_update(probed, rollouts, probe))
        if fixed_before is not None:
            row.update(fixed_batch_row(fixed_before, fixed_batch_scores(probed, self.fixed_probe), self.fixed_probe))
        return row

    def aggregation(self, mask: torch.Tensor) -> tuple[dict, dict]:
        """Token counts of the WHOLE optimizer batch, and the aggregation arguments built on them
        that every micro-batch's loss is normalised by (never per micro-batch)."""
        counts = {name: self.dist.sum(count) for name, count in losses.count_normalizers(mask).items()}  # all ranks
        return counts, dict(agg_mode=self.settings.agg_mode, global_tokens=counts["global_tokens"],
                            global_seqs=counts["global_seqs"], max_len=self.settings.sampling.max_new_tokens)

    @torch.no_grad()
    def _srpo_global_weight_mean(self, rollouts, correct, teacher_prompts) -> torch.Tensor:
        """mean of exp(−β·H_teacher) over ALL failed-rollout tokens of the optimizer batch.

        SRPO normalises its entropy-aware weights to mean 1; doing that per micro-batch would make
        the loss depend on how the batch is split (TRACE.md §8). This costs one extra no-grad teacher
        forward per step, for SRPO only.
        """
        total, count = torch.zeros((), device=self.device), 0
        temperature, chunk = self.settings.sampling.temperature, self.settings.logprob_chunk
        for rows in _micro_batches(len(teacher_prompts), self.settings.micro_batch_size):
            failed = rollouts.completion_mask[rows].bool() & ~correct[rows].bool().unsqueeze(-1)
            if not failed.any() and not self.dist.active:  # every rank must run the sharded teacher alike
                continue
            hidden = self.teacher.hidden_states(self.tokenizer, [teacher_prompts[i] for i in rows],
                                                rollouts.completion_ids[rows], rollouts.completion_mask[rows])
            entropy = losses.chunked_entropy(hidden[failed], self.teacher.lm_head_weight, chunk, temperature)
            total += torch.exp(-self.settings.kl.srpo_entropy_beta * entropy.float()).sum()
            count += int(failed.sum())
        return self.dist.sum(total) / max(int(self.dist.sum(torch.tensor(count, device=self.device))), 1)

    def micro_batch_loss(self, rows, rollouts, advantages, correct, routed, teacher_prompts, lam, step,
                         agg, srpo_weight_mean) -> dict[str, float]:
        """Forward, loss (the method's objective, trace/train/objectives.py) and backward for the rows
        ``rows`` of the optimizer batch; returns the micro-batch's metric sums and token counts."""
        settings = self.settings
        mask = rollouts.completion_mask[rows].bool()
        targets = rollouts.completion_ids[rows]
        W = self.policy.get_output_embeddings().weight
        hidden = completion_hidden_states(self.policy, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                                          rollouts.prompt_ids.shape[1])
        logp_flat, entropy_flat = gather_logprobs(hidden[mask], W, targets[mask], settings.sampling.temperature,
                                                  settings.logprob_chunk)
        logp = losses.tokens_from_positions(logp_flat, mask)
        old_logp = logp.detach()  # one update per batch (mini-batch = batch, as in the paper)

        teacher_hidden = None
        if teacher_prompts is not None:
            teacher_hidden = self.teacher.hidden_states(self.tokenizer, [teacher_prompts[i] for i in rows],
                                                        targets, rollouts.completion_mask[rows])
        batch = MicroBatch(
            settings, self.method, mask, targets, hidden, W, logp, correct[rows],
            None if routed is None else RoutedMasks(routed.key[rows], routed.error[rows], routed.rest[rows]),
            teacher_hidden, None if teacher_hidden is None else self.teacher.lm_head_weight,
            lam, self.schedule.strength(step), agg, srpo_weight_mean,
            guided=None if rollouts.guided_mask is None else rollouts.guided_mask[rows],
            behaviour_logp=None if rollouts.behaviour_logprobs is None else rollouts.behaviour_logprobs[rows])
        objective = objective_for(self.method, teacher_on=teacher_hidden is not None)
        adv = objective.advantages(batch, advantages[rows])
        ppo, clip = losses.ppo_clip_per_token(logp, old_logp, adv, settings.eps_low, settings.eps_high,
                                              settings.dual_clip_c, mask=mask)
        loss = objective.loss(batch, ppo)
        metrics = batch.metrics
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

    def validate(self, step: int) -> dict:
        """Held-out mean@k of the policy now (after step ``step``'s update): trace/train/validation.py."""
        return self.validation.measure(step, self.policy, self.engine, self.tokenizer, self.dist)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        settings = self.settings
        self.run.work.mkdir(parents=True, exist_ok=True)
        steps = range(self.start_step, settings.steps)
        # a fresh start drops rows of an earlier attempt (killed before its first checkpoint)
        # rank 0 writes the metrics (they are global) and the attempt log
        attempt = (_attempt_log(self.run, self.start_step, settings.steps) if self.dist.is_main
                   else contextlib.nullcontext())
        with attempt, open(self.run.live_metrics if self.dist.is_main else os.devnull,
                           "a" if self.start_step > 0 else "w") as live:
            for step in tqdm(steps, desc=f"{settings.method} seed{settings.seed}", initial=self.start_step,
                             total=settings.steps, mininterval=10, disable=not self.dist.is_main):
                row = self.train_step(step)
                if self.validation.due(step):
                    row.update(self.validate(step))
                    log.info("step %d val mean@%d %.4f", step, row["val/k"], row["val/mean_at_k"])
                    if self.validation.select_best:
                        self.validation.keep_if_best(step, row, self._save_policy, self.dist)
                live.write(json.dumps(row) + "\n")
                live.flush()
                log.info("step %d reward %.3f entropy %.3f len %.1f λ %.3f (%.1fs)", step, row["reward_mean"],
                         row["entropy"], row["response_length"], row["lambda"], row["step_s"])
                # the final step too: raising train.steps later continues from here, repeating nothing
                if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
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
        self.dist.save(self.policy, None, folder, dtype=getattr(torch, self.settings.dtype))
        if self.dist.is_main:
            self.tokenizer.save_pretrained(folder)

    def _save_output_model(self) -> None:
        """model/ = the last policy, or (validation.select best) the best-on-validation one, with the
        last kept in work/last."""
        if not self.validation.select_best:
            self._save_policy(self.run.model)
            return
        self._save_policy(self.run.last)
        if self.dist.is_main:
            shutil.rmtree(self.run.model, ignore_errors=True)
            shutil.copytree(self.run.best, self.run.model)
            log.info("model/ = the best-on-validation policy: %s", self.validation.best)


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


def run_fingerprint(settings: TrainRun | Mapping, base_model: Path) -> str:
    """The run's settings (minus the step budget, checkpoint period and how the job is laid out over
    processes: a checkpoint resumes under another world size), its base weights and an external teacher's."""
    from trace.annotate.local import weights_fingerprint

    settings = TrainRun.from_mapping(settings)  # a mapping (tests) is checked and typed, as by Trainer
    layout = ("steps", "save_every", "parallel", "activation_checkpointing")
    method = get_method(settings.method)
    teacher = settings.teacher_model if method.teacher == "external" else None
    unused = method.unused_train_keys  # as in the run's params (study_plan.train_settings)
    settings = {k: v for k, v in settings.to_dict().items() if k not in (*layout, *unused)}
    text = json.dumps(settings, sort_keys=True, default=str) + weights_fingerprint(base_model)
    if teacher is not None:
        text += weights_fingerprint(teacher)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
