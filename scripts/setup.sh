#!/usr/bin/env bash
# One-time set-up, safe to re-run: installs ibot_fast (editable) with its test and demo extras.
# A torch that is already installed (a GPU user's CUDA build) is kept. Without one, the CPU
# build is pinned: an unpinned `torch` -- also inside an isolated PEP 517 build -- would pull the
# newest CUDA build (~2.7 GB) onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
CPU_TORCH=${IBOT_CPU_TORCH:-torch==2.13.0}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing $CPU_TORCH (CPU build)"
    "$PY" -m pip install -q "$CPU_TORCH"
fi
# Installed already (checked from outside the repo, where the working tree cannot shadow it)?
# It must also be *this* checkout: an editable install of another clone would shadow ours.
if ! (cd / && "$PY" -c "
import os, sys
import ibot_fast.kernels, mlxtend, pytest, pytest_benchmark, tqdm, matplotlib, PIL, triton, nvidia.dali
here = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(ibot_fast.__file__).startswith(here + os.sep) else 1)
" "$PWD") >/dev/null 2>&1; then
    "$PY" -m pip install -q setuptools wheel
    # --no-build-isolation: build against the torch installed above, never a downloaded one.
    "$PY" -m pip install -q --no-build-isolation -e ".[dev]"
fi
"$PY" -c "import torch, ibot_fast; print(f'[setup] ibot_fast {ibot_fast.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
