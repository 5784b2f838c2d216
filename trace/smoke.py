"""``python -m trace smoke``: the paper study's CPU smoke, end to end.

Starts the heuristic OpenAI-compatible annotator (trace/annotate/heuristic_server.py) on the port
that workflow/configs/paper_smoke.yaml names, runs Snakemake on that study from the repo root,
and stops the server whatever happens. Extra arguments go to Snakemake (default ``--cores 2``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "workflow" / "configs" / "paper_smoke.yaml"


# glibc's malloc hands every large tensor (a [rows, 151,936] logits block is ~10 MB) back to the kernel
# when it is freed and faults its pages in again at the next allocation: a quarter of a CPU training
# job's time was system time. Keeping freed memory in the process (~0.5 GB more per job) halves that.
# Each job runs on one core (two at a time): one grader worker per job, not two (each imports
# math-verify, ~1 s).
CPU_JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 30),
               "TRACE_VERIFY_WORKERS": "1"}


def annotator_port(config_path: Path = SMOKE_CONFIG) -> int:
    url = yaml.safe_load(config_path.read_text())["train"]["annotator"]["http"]["base_url"]
    return urlparse(url).port


def run_smoke(snakemake_args: list[str], workdir: Path | None = None) -> int:
    from trace.annotate.heuristic_server import serve

    port = annotator_port()
    try:
        server = serve(port)
    except OSError as error:
        print(f"smoke: cannot serve the annotator on 127.0.0.1:{port} ({error}); is another smoke running? "
              f"(the port is train.annotator.http.base_url in {SMOKE_CONFIG.relative_to(REPO)})", file=sys.stderr)
        return 2
    args = list(snakemake_args) or ["--cores", "2"]
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
    if workdir is not None:
        command += ["--directory", str(workdir)]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "OMP_WAIT_POLICY": "PASSIVE", **{name: value for name, value in CPU_JOB_ENV.items() if name not in os.environ}}
    started = time.time()
    try:
        # --configfile last: it takes several values and would swallow a target placed after it
        result = subprocess.run(command + args + ["--configfile", str(SMOKE_CONFIG)],
                                cwd=REPO, env=env)
    finally:
        server.shutdown()
        server.server_close()
    print(f"smoke: snakemake exited {result.returncode} after {time.time() - started:.0f} s", file=sys.stderr)
    return result.returncode
