"""A vLLM OpenAI-compatible server that the training job starts and stops itself.

The served frozen annotator tier (paper: Qwen3-32B, too large to share the training process):
``python -m vllm.entrypoints.openai.api_server`` in a subprocess on 127.0.0.1 with a free port,
health-checked (GET /health) before use, stopped with its owner (``stop()``, when the object is
garbage-collected, or at interpreter exit), and killed with the training job even when that dies
abruptly (the child asks the kernel for SIGTERM when its parent exits: prctl PR_SET_PDEATHSIG).
The annotator talks to it through the HTTP backend (trace/annotate/http.py).

Settings: ``train.rollout.annotator_server`` (``trace.settings.AnnotatorServer``; defaults in the schema).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from trace.settings import AnnotatorServer

log = logging.getLogger(__name__)

# exec vLLM with "SIGTERM me when my parent dies" set (prctl(PR_SET_PDEATHSIG) survives exec)
_LAUNCHER = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, log_file) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log_file.close()


class VLLMServer:
    def __init__(self, model: Path | str, settings: AnnotatorServer, dtype: str, cache_dir: Path | str, seed: int = 0):
        """``dtype``: the server's (annotator_server.dtype, else train.dtype)."""
        import torch

        self.name = str(model)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(settings.log or cache_dir / f"vllm_server_{self.port}.log")
        cmd = [sys.executable, "-c", _LAUNCHER, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", settings.dtype or dtype, "--seed", str(seed), "--generation-config", "vllm"]
        if settings.max_model_len:
            cmd += ["--max-model-len", str(settings.max_model_len)]
        if settings.enforce_eager:
            cmd.append("--enforce-eager")
        if torch.cuda.is_available():
            cmd += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
        cmd += [str(a) for a in settings.extra_args]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(max(1, round(settings.kv_cache_gib))))
        env.setdefault("VLLM_CACHE_ROOT", str(cache_dir / "vllm"))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine its own way
        log_file = open(self.log_path, "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._finalizer = weakref.finalize(self, _stop, self.proc, log_file)
        try:
            self._wait_until_healthy(started + float(settings.startup_timeout_s))
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("vLLM server for %s up on port %d after %.1fs (log %s)", model, self.port, self.startup_s,
                 self.log_path)

    def _wait_until_healthy(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server for {self.name} exited with code {self.proc.returncode} "
                                   f"before it was ready: {self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the vLLM server for {self.name} was not healthy within "
                           "train.rollout.annotator_server.startup_timeout_s; log: " + self._log_tail())

    def _log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return f"(no log at {self.log_path})"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self._finalizer()
