import os

import pytest
import torch

# Tests are CPU-only by default and must not fight over the 2 cores of a CI machine: under
# pytest-xdist (``make test`` runs 2 workers) each worker, and every process it starts, computes
# on its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
TEST_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)

# Triton runs on the CPU only through its interpreter, which reads this variable when triton is
# first imported (importing torch does not import triton): set it before any test module does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The files that take longest, longest first (measured: the full demo alone is minutes). With
# ``--dist loadfile`` xdist hands out whole files in collection order, so starting these first
# keeps one long file from running alone at the end while the other worker idles.
LONGEST_FILES_FIRST = ("test_knn.py", "test_reliability.py", "test_fast_step.py",
                       "test_train.py", "test_kernels_sm90.py", "test_fast_step_fused.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order in a file
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
