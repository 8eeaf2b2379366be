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
# The C++ mask extension must import too, so a fresh clone (no .so yet) builds it; where it
# cannot be built (no compiler) the install still succeeds and masks fall back to Python, and
# IBOT_FAST_NO_EXT=1 skips both the build and this check.
# (the checkout's path is taken before the `cd /`: inside it, $PWD would be /)
REPO_DIR=$PWD
if ! (cd / && IBOT_FAST_NO_EXT=${IBOT_FAST_NO_EXT:-0} "$PY" -c "
import os, sys
import ibot_fast.kernels, mlxtend, pytest, pytest_benchmark, xdist, tqdm, matplotlib, PIL, triton, nvidia.dali
import torch
here = os.path.realpath(sys.argv[1])
if os.environ['IBOT_FAST_NO_EXT'] != '1':
    import glob, ibot_fast._mask_ext as ext
    # a stale build (csrc/ changed since) counts as missing
    sources = glob.glob(os.path.join(here, 'csrc', '*'))
    if max(map(os.path.getmtime, sources)) > os.path.getmtime(ext.__file__):
        sys.exit(1)
sys.exit(0 if os.path.realpath(ibot_fast.__file__).startswith(here + os.sep) else 1)
" "$REPO_DIR") >/dev/null 2>&1; then
    "$PY" -m pip install -q setuptools wheel
    # --no-build-isolation: build against the torch installed above, never a downloaded one.
    "$PY" -m pip install -q --no-build-isolation -e ".[dev]"
fi
"$PY" -c "import torch, ibot_fast, ibot_fast.masking as m; print(f'[setup] ibot_fast {ibot_fast.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}, mask backend {m.default_mask_backend()}')"
