"""How a training job is started, from ``train.parallel`` (the train rule calls these):

    nodes × procs_per_node == 1   {python} -m trace train ...                    (one plain process)
    one node, n processes          {python} -m torch.distributed.run --standalone --nproc_per_node n -m trace train ...
    several nodes (SLURM)          srun --nodes N --ntasks-per-node 1 {python} -m torch.distributed.run --nnodes N
                                        --nproc_per_node n --rdzv-backend c10d --rdzv-endpoint <first node>:<port>
                                        --rdzv-id $SLURM_JOB_ID -m trace train ...

Under torchrun every process is one rank of the FSDP2 job (trace/train/distributed.py): one GPU each on
CUDA (``procs_per_node`` = GPUs per node), gloo processes on CPU. Checkpoints are written to the shared
run folder, so every node must see it.
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import yaml

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def parallel_defaults() -> dict:
    """train.parallel's defaults: the schema's (one place; this module is loaded by path by the Snakefile,
    so it reads the schema itself rather than importing trace.settings)."""
    node = yaml.safe_load(SCHEMA_FILE.read_text())["properties"]["train"]["properties"]["parallel"]["properties"]
    return {key: spec["default"] for key, spec in node.items()}


def parallel_settings(train_cfg: dict) -> dict:
    """train.parallel with defaults, checked (one clear error naming the key)."""
    defaults = parallel_defaults()
    settings = {**defaults, **(train_cfg.get("parallel") or {})}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ValueError(f"train.parallel: unknown key(s) {sorted(unknown)}; known: {sorted(defaults)}")
    for key in ("nodes", "procs_per_node", "cpus_per_proc", "runtime_min", "rdzv_port"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ValueError(f"train.parallel.{key} must be a positive integer, not {settings[key]!r}")
    return settings


def world_size(train_cfg: dict) -> int:
    settings = parallel_settings(train_cfg)
    return settings["nodes"] * settings["procs_per_node"]


def train_launcher(train_cfg: dict, python: str = "python") -> str:
    """The shell prefix that replaces ``{python}`` in ``{python} -m trace train ...``."""
    s = parallel_settings(train_cfg)
    if s["nodes"] * s["procs_per_node"] == 1:
        return python
    torchrun = f"{python} -m torch.distributed.run --nproc_per_node {s['procs_per_node']}"
    if s["nodes"] == 1:
        return f"{torchrun} --standalone"
    endpoint = f"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):{s['rdzv_port']}"
    return (f"srun --nodes {s['nodes']} --ntasks-per-node 1 {torchrun} --nnodes {s['nodes']} "
            f"--rdzv-backend c10d --rdzv-endpoint {endpoint} --rdzv-id \"$SLURM_JOB_ID\"")


def train_resources(train_cfg: dict) -> dict:
    """Snakemake resources of one training job (per node where SLURM asks per node)."""
    s = parallel_settings(train_cfg)
    gpus = s["procs_per_node"] if train_cfg.get("device") == "cuda" else 0
    resources = {"nodes": s["nodes"], "tasks": s["nodes"], "cpus_per_task": s["procs_per_node"] * s["cpus_per_proc"],
                 "gpu": gpus, "runtime": s["runtime_min"]}
    if s["mem_mb_per_node"]:
        resources["mem_mb"] = s["mem_mb_per_node"]
    return resources


def no_cuda_message(setting: str) -> str:
    """What a job that asked for CUDA but sees none says: its rank and the GPUs the scheduler gave it
    (a wrong GPU request shows here, not hours later)."""
    rank = os.environ.get("RANK")
    where = f"rank {rank} of {os.environ.get('WORLD_SIZE')}, " if rank is not None else ""
    return (f"{setting} is 'cuda' but no CUDA device is usable ({where}host {socket.gethostname()}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
