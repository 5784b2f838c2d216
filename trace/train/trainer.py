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
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trace import losses
from trace.annotate.backends import AnnotationRequest
from trace.annotate.offsets import completion_text_and_offsets
from trace.methods import MethodSpec, get_method
from trace.prompting import render_prompt
from trace.rollout import RolloutBatch, build_engine
from trace.router import CORNERS, RoutedMasks, build_routed_masks
from trace.schedule import LambdaSchedule
from trace.train.logprobs import completion_hidden_states, gather_logprobs
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


def load_records(path: Path) -> list[dict]:
    if not Path(path).exists():
        raise FileNotFoundError(f"training data {path} does not exist (run the data rule first)")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Trainer:
    def __init__(self, cfg: dict, base_model: Path, train_path: Path, run_dir: Path, annotator=None, engine=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.run = cfg, RunDir(run_dir)
        self.method: MethodSpec = get_method(cfg["method"])
        self.records = [r for r in load_records(train_path) if r.get("answer") not in (None, "")]
        self.device = torch.device(cfg.get("device", "cpu") if cfg.get("device", "auto") != "auto"
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        self.fingerprint = run_fingerprint(cfg, base_model)
        self.start_step = self._resume_step()
        weights = self.run.checkpoint if self.start_step > 0 else base_model
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        self.policy = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype).to(self.device)
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
            # frozen = the initial student: load the base weights even when resuming
            source = (AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(self.device)
                      if self.method.teacher == "frozen" else self.policy)
            self.teacher = Teacher(source, self.method.teacher, kl["teacher_sync_every"], kl["ema_rate"])
        if self.method.needs_annotation and self.teacher is not None and annotator is None:
            # the configured tier (train.annotator), built here: the self tier annotates with the live policy
            from trace.annotate.setup import annotator_for

            annotator = annotator_for(cfg, base_model, policy=self.policy, tokenizer=self.tokenizer,
                                      engine=self.engine)
            if annotator is None:
                raise ValueError(f"method {cfg['method']!r} routes on annotated spans: configure an annotator")
        self.annotator = annotator
        if self.start_step > 0:
            self._load_trainer_state()

    # ------------------------------------------------------------------ resumability
    def _resume_step(self) -> int:
        """Where to start: the checkpoint's next step if it belongs to THIS run (same settings and
        base weights; only ``steps`` / ``save_every`` may differ, to extend a run), else 0."""
        state = self.run.checkpoint / "trainer_state.pt"
        if not state.exists():
            return 0
        saved = torch.load(state, weights_only=False)
        if saved.get("fingerprint") != self.fingerprint:
            log.warning("ignoring the checkpoint in %s: it was written with other settings or base weights; "
                        "training from step 0", self.run.checkpoint)
            return 0
        return int(saved["next_step"])

    def _load_trainer_state(self) -> None:
        state = torch.load(self.run.checkpoint / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.model.load_state_dict(state["teacher"])
        kept = [ln for ln in self.run.live_metrics.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] < self.start_step] if self.run.live_metrics.exists() else []
        self.run.live_metrics.write_text("".join(ln + "\n" for ln in kept))
        log.info("resumed %s at step %d", self.run.root, self.start_step)

    def _save_checkpoint(self, next_step: int) -> None:
        """Atomic: write beside, then swap, so a kill mid-save keeps the previous checkpoint."""
        tmp = self.run.work / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.save_pretrained(tmp)
        teacher_state = (self.teacher.model.state_dict()
                         if self.teacher is not None and self.teacher.mode == "ema" else None)
        torch.save({"next_step": next_step, "optimizer": self.optimizer.state_dict(), "teacher": teacher_state,
                    "fingerprint": self.fingerprint}, tmp / "trainer_state.pt")
        shutil.rmtree(self.run.checkpoint, ignore_errors=True)
        tmp.rename(self.run.checkpoint)

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
            if ids and ids[-1] == self.engine.eos_id:
                ids = ids[:-1]  # the end-of-turn token decodes to text the annotator never sees
            text, offsets = completion_text_and_offsets(self.tokenizer, ids)
            requests.append(AnnotationRequest(record["problem"], record.get("solution") or "", text,
                                              bool(correct[row]), offsets))
            lengths.append(len(ids))
        results = self.annotator.annotate(requests)
        for row, (result, length) in enumerate(zip(results, lengths)):
            if result.token_mask is None or result.span_kind is None:
                continue
            target = key if result.span_kind == "key" else error
            target[row, :length] = torch.tensor(result.token_mask, dtype=torch.bool)
            prefixes[row] = result.teacher_prefix
        stats = self.annotator.last_call_stats.as_dict()
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
        prompt_records = self.sample_prompts(step)
        records = [r for r in prompt_records for _ in range(G)]
        prompts = [render_prompt(self.tokenizer, r, cfg["thinking"]) for r in prompt_records]
        rollouts = self.engine.generate(self.policy, prompts, G)
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
        if teacher_on:
            self.teacher.update(self.policy, step)

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
        for rows in _micro_batches(len(records), cfg["micro_batch_size"]):
            metrics = self._micro_batch_loss(rows, rollouts, advantages, correct, routed, teacher_prompts,
                                             lam, step, agg, srpo_weight_mean)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg["grad_clip"])
        self.optimizer.step()
        self.engine.sync_weights(self.policy)  # the next rollouts (and the self annotator) use the new weights

        n_tokens = float(counts["global_tokens"])
        row = {
            "step": step,
            "reward_mean": rewards.mean().item(),
            "accuracy": correct.float().mean().item(),
            "entropy": sums.pop("entropy_sum") / n_tokens,
            "response_length": n_tokens / len(records),
            "clip_frac_high": sums.pop("clipped_high") / n_tokens,
            "clip_frac_low": sums.pop("clipped_low") / n_tokens,
            "grad_norm": float(grad_norm),
            "loss": sums.pop("loss"),
            "lambda": lam,
            "rho": self.schedule.rho(step) if self.method.objective == "trace" else 1.0,
            "teacher_active": int(teacher_on),
            "groups_with_signal": float((rewards.view(-1, G).std(dim=1) > 0).float().mean()),
            "rollout_s": round(t_rollout, 3),
            "step_s": round(time.time() - started, 3),
        }
        if routed is not None:
            row.update(tokens_key=float(routed.key.sum()), tokens_error=float(routed.error.sum()),
                       span_coverage=float((routed.key | routed.error).sum()) / n_tokens)
        if "teacher_entropy_sum" in sums:  # per routed (distilled) token, not per micro-batch
            row["teacher_entropy"] = sums.pop("teacher_entropy_sum") / max(sums.pop("teacher_entropy_tokens"), 1.0)
        row.update({name: value for name, value in sums.items()})
        row.update({k: v for k, v in annotation_stats.items() if isinstance(v, (int, float))})
        return row

    def aggregation(self, mask: torch.Tensor) -> tuple[dict, dict]:
        """Token counts of the WHOLE optimizer batch, and the aggregation arguments built on them
        that every micro-batch's loss is normalised by (never per micro-batch)."""
        counts = losses.count_normalizers(mask)
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
            if not failed.any():
                continue
            hidden = self.teacher.hidden_states(self.tokenizer, [teacher_prompts[i] for i in rows],
                                                rollouts.completion_ids[rows], rollouts.completion_mask[rows])
            entropy = losses.chunked_entropy(hidden[failed], self.teacher.lm_head_weight, chunk, temperature)
            total += torch.exp(-self.cfg["kl"]["srpo_entropy_beta"] * entropy.float()).sum()
            count += int(failed.sum())
        return total / max(count, 1)

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

        def divergence(where: torch.Tensor, kind: str, **extra) -> torch.Tensor:
            """Per-token divergence at the routed positions only (zeros elsewhere)."""
            values = losses.chunked_divergence(
                hidden[where], teacher_hidden[where], W, kind, chunk_size=cfg["logprob_chunk"],
                teacher_lm_head_weight=self.teacher.lm_head_weight, top_k=kl["top_k"],
                tail_bucket=kl["tail_bucket"], entry_clip=kl["entry_clip"], temperature=temperature, **extra)
            return losses.tokens_from_positions(values, where)

        if method.objective == "trace" and teacher_hidden is not None:
            sub = RoutedMasks(routed.key[rows], routed.error[rows], routed.rest[rows])
            mu_E, mu_K = CORNERS[method.corner]
            fkl = divergence(sub.key, "fkl") if (lam and mu_K) else None
            rkl = divergence(sub.error, "rkl") if (lam and mu_E) else None
            loss, parts = losses.trace_objective(
                ppo, mask, sub.key, sub.error, fkl, rkl, lam=lam, w0=kl["w0"], mu_E=mu_E, mu_K=mu_K,
                full_grpo_on_spans_without_kl=kl["full_grpo_on_spans_without_kl"], **agg)
            metrics.update({f"kl/{k}": float(v) for k, v in parts.items()
                            if k in ("kl_key_branch", "kl_error_branch", "fkl_key_token_mean", "rkl_error_token_mean")})
        elif method.objective == "sdpo" and teacher_hidden is not None:
            jsd = divergence(mask, "jsd", beta=kl["jsd_beta"])
            loss, parts = losses.sdpo_objective(ppo, mask, jsd, distillation_weight=kl["sdpo_distillation_weight"], **agg)
            metrics["kl/distill"] = float(parts["distill"])
        elif method.objective == "srpo" and teacher_hidden is not None:
            failed = mask & ~correct[rows].bool().unsqueeze(-1)
            jsd = divergence(failed, "jsd", beta=kl["jsd_beta"])
            teacher_entropy = losses.tokens_from_positions(
                losses.chunked_entropy(teacher_hidden[failed], self.teacher.lm_head_weight, cfg["logprob_chunk"],
                                       temperature), failed)
            loss, parts = losses.srpo_objective(ppo, mask, jsd, correct[rows], teacher_entropy,
                                                entropy_beta=kl["srpo_entropy_beta"],
                                                weight_global_mean=srpo_weight_mean, **agg)
            metrics.update({"kl/distill": float(parts["distill"]),
                            "srpo_weight_raw_mean": float(parts["entropy_weight_raw_mean"])})
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
        with open(self.run.live_metrics, "a" if self.start_step > 0 else "w") as live:
            for step in tqdm(steps, desc=f"{cfg['method']} seed{cfg['seed']}", initial=self.start_step,
                             total=cfg["steps"], mininterval=10):
                row = self.train_step(step)
                live.write(json.dumps(row) + "\n")
                live.flush()
                log.info("step %d reward %.3f entropy %.3f len %.1f λ %.3f (%.1fs)", step, row["reward_mean"],
                         row["entropy"], row["response_length"], row["lambda"], row["step_s"])
                if (step + 1) % cfg["save_every"] == 0 and step + 1 < cfg["steps"]:
                    self._save_checkpoint(step + 1)
        self.policy.save_pretrained(self.run.model)
        self.tokenizer.save_pretrained(self.run.model)
        shutil.copyfile(self.run.live_metrics, self.run.metrics)
        return self.run.model


def run_fingerprint(cfg: dict, base_model: Path) -> str:
    """The run's settings (minus the step budget and checkpoint period) and its base weights."""
    from trace.annotate.local import weights_fingerprint

    settings = {k: v for k, v in cfg.items() if k not in ("steps", "save_every")}
    text = json.dumps(settings, sort_keys=True, default=str) + weights_fingerprint(base_model)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
