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
# On a machine without a GPU, DeepSpeed compiles its shared-memory all-reduce
# the first time a process group starts under it. Build it here, once and in
# one process, so that ZeRO-3 runs do not race to compile it (or time out).
"$PY" - <<'PYEOF' 2>&1 | grep -v -e WARNING -e 'cannot find -laio' -e 'collect2' || true
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)
PYEOF
