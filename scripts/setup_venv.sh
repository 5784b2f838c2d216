#!/usr/bin/env bash
# Create .venv at the repo root (if missing or stale) and install the pinned dependencies.
# torch is pinned in the same pip command as everything that depends on it, so pip never pulls
# a multi-GB CUDA build by accident. Idempotent: a second call only checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
echo "$want" > "$stamp"
