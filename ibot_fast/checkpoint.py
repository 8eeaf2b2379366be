"""Checkpoints: atomic writes, reference-compatible keys, resume.

Layout (reference §7.3): ``student``, ``teacher``, ``optimizer``, ``epoch`` (epochs completed),
``args``, ``ibot_loss`` (``center``, ``center2``), ``fp16_scaler``. Differences, on purpose:
``args`` is stored as a plain dict (so ``torch.load(weights_only=True)`` opens our files), and
student keys carry no DDP ``module.`` prefix (a reference checkpoint's prefix is stripped on load).
A file is written to a temporary name in the same directory, flushed and fsync'd, then renamed
over the old one: a crash mid-write never leaves a truncated ``checkpoint.pth``.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch


def atomic_save(obj, path: str):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def strip_prefix(state_dict: dict, prefixes=("module.",)) -> dict:
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        # Reference checkpoints pickle an argparse.Namespace under 'args'.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)


def args_to_dict(args) -> dict:
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def find_resume_path(output_dir: str, load_from: str | None, resume: bool) -> str | None:
    """``--load_from`` (relative to output_dir, as in the reference) or the auto checkpoint."""
    if load_from:
        path = load_from if os.path.isabs(load_from) else os.path.join(output_dir, load_from)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load_from {load_from!r}: {path!r} does not exist")
        return path
    path = os.path.join(output_dir, "checkpoint.pth")
    return path if resume and os.path.isfile(path) else None
