#!/usr/bin/env bash
# Install dist-chita and what it needs, idempotently. torch comes first and
# pinned: a bare `torch` requirement on a machine without it pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
