"""Data-parallel training over processes: ``torchrun`` + PyTorch FSDP2 (``fully_shard``).

One plain process (``python -m trace train``) never touches ``torch.distributed``: every helper here is
then the identity, and the trainer computes exactly what it always did. Under ``torchrun`` (``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment) each rank

  * holds a shard of the policy and of the teacher (``fully_shard`` per decoder layer, then the root);
    parameters are kept in fp32 (the master weights; AdamW state is fp32 too) and the forward and
    backward run in ``train.dtype`` (bf16 on GPUs) through a ``MixedPrecisionPolicy``;
  * takes a contiguous share of the step's prompts (whole groups of G rollouts, so rewards and group
    advantages are computed locally): the global batch is the one-process batch;
  * normalises its loss by the GLOBAL token / sequence counts (all-reduced) and sums gradients over
    ranks (the reduce-scatter divides by 1, not by the world size), so the loss and the gradient do
    not depend on the number of ranks;
  * writes checkpoints as a gathered Hugging Face folder (the weights, loadable by any world size and
    by a plain process) plus the optimizer state through ``torch.distributed.checkpoint``, which
    reshards on load (under any world size, or in a plain process without a process group).

The trainer computes log-probs from the body's hidden states and the output embedding OUTSIDE the
model's ``forward`` (chunked vocabulary projection). FSDP only gathers parameters around registered
forward methods, so ``get_decoder`` and ``get_output_embeddings`` are registered as such on the root:
they gather the root's own parameters (embedding, final norm, lm head) and, as FSDP does for the root,
keep them gathered until the backward has reduced their gradients. Call ``reshard`` before touching
``parameters()`` directly.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from trace.router import RoutedMasks
from trace.rollout import RolloutBatch
from trace.settings import TrainRun

OPTIMIZER_DIR = "optimizer_dcp"  # inside a checkpoint folder written under torchrun


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def pick_device(requested: str) -> torch.device:
    """train.device: auto | cpu | cuda (auto: cuda when a GPU is visible)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        from trace.launch import no_cuda_message

        raise ValueError(no_cuda_message("train.device"))
    return torch.device(requested)


def _register_argless_forward_method(model, name: str, register) -> None:
    """``register_fsdp_forward_method`` for a method called with no arguments (``get_decoder()``).

    On CUDA, FSDP2's root pre-forward moves the call's inputs to the device and indexes the moved
    (args, kwargs) tuples, which are empty for a call without arguments (torch 2.11: IndexError in
    ``_root_pre_forward``; CPU and torch 2.13 skip it). So the hooked method receives one ignored keyword.
    """
    plain = getattr(model, name)
    model.__dict__[name] = lambda _fsdp_input=None: plain()
    register(model, name)
    hooked = getattr(model, name)
    model.__dict__[name] = lambda: hooked(_fsdp_input=0)


class Distributed:
    """This process's place in the job. ``mesh is None``: one plain process."""

    def __init__(self, device: str = "auto"):
        self.rank, self.world_size, self.mesh = 0, 1, None
        self.device = pick_device(device)
        if not launched_by_torchrun():
            return
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    @property
    def active(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def share(self, items: list) -> tuple[int, list]:
        """This rank's contiguous share of the step's prompts and the global index of its first one."""
        if len(items) % self.world_size:
            raise ValueError(f"train.batch_prompts ({len(items)}) must be a multiple of the number of training "
                             f"processes ({self.world_size}: train.parallel.nodes × procs_per_node)")
        size = len(items) // self.world_size
        return self.rank * size, items[self.rank * size:(self.rank + 1) * size]

    def share_padded(self, items: list) -> list[tuple[int | None, object]]:
        """(global index, item) for this rank's contiguous share of any number of items, padded with
        (None, items[0]) to the same length on every rank: sharded generation runs in lock-step, so
        every rank makes the same calls; padded results are dropped."""
        size = -(-len(items) // self.world_size)
        mine = list(enumerate(items))[self.rank * size:(self.rank + 1) * size]
        return mine + [(None, items[0])] * (size - len(mine))

    # ------------------------------------------------------------------ reductions (identity in one process)
    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def mean(self, value: float) -> float:
        """Mean over ranks of a per-rank mean over equally many rows (the global mean)."""
        if not self.active:
            return value
        return float(self.sum(torch.tensor(float(value), dtype=torch.float64, device=self.device))) / self.world_size

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Metric sums over every rank's micro-batches; keys present on some ranks only count as 0 elsewhere."""
        if not self.active:
            return values
        keys = sorted(set().union(*self.gather_objects(sorted(values))))
        summed = self.sum(torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64,
                                       device=self.device))
        return dict(zip(keys, summed.tolist()))

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def merge_stats(self, stats):
        """One AnnotationStats over all ranks' rollouts (counters add, rates are recomputed by as_dict)."""
        if not self.active:
            return stats
        merged, *others = self.gather_objects(stats)
        for other in others:
            merged.merge(other)
        return merged

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        value = torch.tensor(value, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ models
    def storage_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """Sharded parameters are fp32 master weights; a plain process keeps train.dtype as before."""
        return torch.float32 if self.active else compute_dtype

    def prepare(self, model, compute_dtype: torch.dtype, activation_checkpointing: bool = False):
        """Activation checkpointing (per decoder layer, when asked) and, under torchrun, FSDP2 sharding."""
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not self.active:
            return model
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        for method in ("get_decoder", "get_output_embeddings"):  # see the module docstring
            _register_argless_forward_method(model, method, register_fsdp_forward_method)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # each rank's loss is already divided by the GLOBAL counts: sum gradients, do not average
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
        return model

    def reshard(self, *models) -> None:
        """Drop the gathered root parameters (kept after a forward), so parameters() are the shards again."""
        if self.active:
            for model in models:
                model.reshard()

    def grad_norm(self, norm) -> float:
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ------------------------------------------------------------------ checkpoints
    def save(self, model, optimizer, folder: Path, dtype: torch.dtype | None = None) -> None:
        """The model as a Hugging Face folder (gathered on rank 0) and, if an optimizer is given, its
        sharded state through torch.distributed.checkpoint. In one plain process: save_pretrained."""
        folder = Path(folder)
        if not self.active:
            model.save_pretrained(folder)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied weight (lm head = embedding) is one tensor under two names: keep the first, as save_pretrained does
        seen, tied = set(), set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                tied.add(name)
            seen.add(id(param))
        full = {name: tensor for name, tensor in full.items() if name not in tied}
        if self.is_main:
            if dtype is not None:
                full = {name: tensor.to(dtype) for name, tensor in full.items()}
            model.save_pretrained(folder, state_dict=full)
        if optimizer is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=str(folder / OPTIMIZER_DIR))
        self.barrier()

    def load_optimizer(self, model, optimizer, folder: Path, saved_state: dict) -> None:
        """Optimizer state from either checkpoint format, under any world size."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        if (Path(folder) / OPTIMIZER_DIR).exists():  # written under torchrun: DCP reshards on load
            import torch.distributed.checkpoint as dcp

            state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=str(Path(folder) / OPTIMIZER_DIR))
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        elif not self.active:  # a plain checkpoint in a plain process: exactly as before
            optimizer.load_state_dict(saved_state["optimizer"])
        else:  # a plain checkpoint under torchrun: parameters are named instead of numbered
            names = [name for name, _ in model.named_parameters()]
            plain = saved_state["optimizer"]
            by_name = {"state": {names[i]: s for i, s in plain["state"].items()},
                       "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in plain["param_groups"]]}
            set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def model_state(self, model) -> dict:
        """Full (gathered) state dict, e.g. the EMA teacher's; a plain state_dict in one process."""
        if not self.active:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model, state: dict) -> None:
        if not self.active:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- rollouts and micro-batches
def rollout_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The sampling seed of one rollout: sample j of the step's prompt i (global index), any rank."""
    return int(hashlib.sha256(f"{seed}:{step}:{prompt}:{sample}".encode()).hexdigest()[:15], 16)


def rollout_options(settings: TrainRun, dist_: Distributed, step: int, first_prompt: int, n_prompts: int) -> dict:
    """train.rollout_rng: 'step' = one torch seed per step for the whole batch (a row's samples depend on
    the batch it is in); 'rollout' = each rollout its own generator (rollout_seed), so a rank's share
    reproduces the one-process rollouts; 'auto' = step in one plain process, rollout under torchrun."""
    seeds = None
    if seeds_per_rollout(settings, dist_):
        seeds = [rollout_seed(settings.seed, step, first_prompt + i, j)
                 for i in range(n_prompts) for j in range(settings.group_size)]
    return dict(row_seeds=seeds, synced=dist_.active)


def seeds_per_rollout(settings: TrainRun, dist_: Distributed) -> bool:
    """Whether train.rollout_rng gives each rollout its own generator (see rollout_options)."""
    mode = settings.rollout_rng  # auto | step | rollout (the schema)
    return mode == "rollout" or (mode == "auto" and dist_.active)


def token_budget_plan(rollouts: RolloutBatch, token_budget: int, max_rows: int, dist_: Distributed) -> list[list[int]]:
    """Micro-batches whose trimmed, padded size rows × (longest prompt + longest completion) stays within
    train.micro_batch_tokens (a single longer row still gets its own), at most max_rows rows each. Rows are
    grouped by length to waste little padding; the loss does not depend on the split (global normalisers).
    Every rank runs as many micro-batches as the busiest one (FSDP gathers weights in lock-step)."""
    prompt_len = rollouts.prompt_mask.sum(1).tolist()
    completion_len = rollouts.completion_mask.sum(1).tolist()
    order = sorted(range(len(prompt_len)), key=lambda i: (prompt_len[i] + completion_len[i], i))
    plan: list[list[int]] = []
    for i in order:
        rows = plan[-1] + [i] if plan else [i]
        width = max(prompt_len[r] for r in rows) + max(completion_len[r] for r in rows)
        if plan and len(rows) <= max_rows and len(rows) * width <= token_budget:
            plan[-1] = rows
        else:
            plan.append([i])
    for _ in range(dist_.max_int(len(plan)) - len(plan)):  # ranks have equally many rows: always possible
        biggest = max(range(len(plan)), key=lambda k: len(plan[k]))
        rows = plan.pop(biggest)
        plan[biggest:biggest] = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
    return plan


def trim_micro_batch(rows, rollouts: RolloutBatch, advantages, correct, routed, teacher_prompts):
    """The micro-batch on its own: its rows, cut to its longest prompt (left padding) and completion
    (right padding); the dropped columns are padding in every row, so the loss is unchanged."""
    p = int(rollouts.prompt_mask[rows].sum(1).max())
    t = max(int(rollouts.completion_mask[rows].sum(1).max()), 1)
    sub = rollouts.take(rows, p, t)
    if routed is not None:
        routed = RoutedMasks(routed.key[rows, :t], routed.error[rows, :t], routed.rest[rows, :t])
    prompts = None if teacher_prompts is None else [teacher_prompts[i] for i in rows]
    return list(range(len(rows))), sub, advantages[rows], correct[rows], routed, prompts
