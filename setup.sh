#!/usr/bin/env bash
# Creates .venv and installs the pinned requirements (idempotent: skips when nothing changed).
# torch==2.13.0 resolves to the CPU build; for CUDA clusters see cluster/README.md.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import torch, ray, mlflow" 2>/dev/null; then
  exit 0
fi
echo "setup: installing requirements into .venv (first run takes ~2 minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, on its own, so that nothing else can pull in a different (CUDA) build
.venv/bin/pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)" 2> >(grep -v "is ignored" >&2)
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored" >&2)
echo "$want" > "$stamp"
