"""Checkpoints: atomic writes, reference-compatible keys, resume.

Layout (reference §7.3): ``student``, ``teacher``, ``optimizer``, ``epoch`` (epochs completed),
``args``, ``ibot_loss`` (``center``, ``center2``), ``fp16_scaler``. Differences, on purpose:
``args`` is stored as a plain dict (so ``torch.load(weights_only=True)`` opens our files), and
student keys carry no DDP ``module.`` prefix (a reference checkpoint's prefix is stripped on load).
A file is written to a temporary name in the same directory, flushed and fsync'd, then renamed
over the old one: a crash mid-write never leaves a truncated ``checkpoint.pth``.

Rolling history (``--keep_checkpoints K``): ``checkpoint.pth`` is the newest, ``checkpoint.1.pth``
the one before, ... ``checkpoint.{K-1}.pth``. The new file is written completely before anything
is rotated, so a failed write (a full disk) leaves every existing checkpoint as it was. On resume
each candidate is verified (readable, expected keys, shapes of this run's model, finite values);
a corrupt one is reported and the next older one is used.
"""
from __future__ import annotations

import argparse
import errno
import glob
import os
import tempfile

import torch

REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "ibot_loss")


class CorruptCheckpointError(RuntimeError):
    """The file cannot be used (unreadable, truncated, keys missing, non-finite values)."""


class IncompatibleCheckpointError(ValueError):
    """The file is sound but belongs to another model (``--arch``, ``--patch_size``, ...)."""


TMP_PREFIX = ".tmp_"


def _write_tmp(obj, directory: str) -> str:
    """``obj`` fully written and fsync'd to a temporary file in ``directory``; its path."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"cannot write a checkpoint in {directory!r}: "
                          f"{os.strerror(err.errno)}. Nothing was replaced: the previous "
                          f"checkpoints there are intact. Free some space (or lower "
                          f"--keep_checkpoints / --saveckp_freq) and run the same command "
                          f"again to resume.") from err
        raise
    return tmp


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _install(tmp: str, path: str, directory: str, prepare=None):
    """Rename the fully written ``tmp`` onto ``path`` (after ``prepare()``, e.g. rotating the
    older files); on any failure the temporary file is removed and ``path`` is untouched."""
    try:
        if prepare is not None:
            prepare()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_save(obj, path: str):
    directory = os.path.dirname(os.path.abspath(path))
    _install(_write_tmp(obj, directory), path, directory)


def rotated_name(path: str, k: int) -> str:
    """``checkpoint.pth`` -> ``checkpoint.{k}.pth`` (k = 0 is the file itself)."""
    if k == 0:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{k}{ext}"


def save_rotating(obj, path: str, keep: int = 1):
    """Write ``obj`` to ``path`` atomically, keeping the ``keep - 1`` previous files as
    ``path``'s ``.1`` (newest) ... ``.{keep-1}`` (oldest) siblings."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _write_tmp(obj, directory)  # a failure here has touched nothing

    def rotate():
        if keep > 1 and os.path.isfile(path):
            for k in range(keep - 1, 1, -1):
                older = rotated_name(path, k - 1)
                if os.path.isfile(older):
                    os.replace(older, rotated_name(path, k))
            # A hard link keeps ``path`` in place until the new file replaces it (no window
            # without a checkpoint.pth); where links are not supported, a rename does.
            link = os.path.join(directory, f"{TMP_PREFIX}link_{os.path.basename(tmp)}")
            try:
                os.link(path, link)
                os.replace(link, rotated_name(path, 1))
            except OSError:
                os.replace(path, rotated_name(path, 1))
        for k in range(keep, keep + 64):  # a lowered --keep_checkpoints drops the surplus
            extra = rotated_name(path, k)
            if not os.path.isfile(extra):
                break
            os.remove(extra)

    _install(tmp, path, directory, prepare=rotate)


def remove_stale_tmp(directory: str) -> list[str]:
    """Temporary files of writes a crash interrupted (never a complete checkpoint)."""
    stale = glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*"))
    for f in stale:
        try:
            os.remove(f)
        except OSError:
            pass
    return stale


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


def resume_candidates(output_dir: str, keep: int) -> list[str]:
    """``checkpoint.pth`` and its rotated predecessors that exist, newest first."""
    base = os.path.join(output_dir, "checkpoint.pth")
    names = [rotated_name(base, k) for k in range(max(keep, 1) + 63)]
    return [p for p in names if os.path.isfile(p)]


def _arch_summary(args: dict | None) -> str:
    if not args:
        return "unknown flags"
    keys = ("arch", "patch_size", "out_dim", "patch_out_dim", "shared_head", "head_hidden_dim",
            "head_bottleneck_dim", "global_crops_size", "use_masked_im_modeling")
    return " ".join(f"--{k} {args[k]}" for k in keys if k in args)


def verify_checkpoint(state, expected: dict[str, dict[str, torch.Tensor]], path: str = "",
                      run_args: dict | None = None):
    """Raise ``CorruptCheckpointError`` or ``IncompatibleCheckpointError`` unless ``state`` has
    the trainer's keys, tensors of the shapes in ``expected`` (``{"student": state_dict, ...}``)
    and only finite floating-point values."""
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: not a checkpoint dictionary")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CorruptCheckpointError(f"{path}: missing {missing}")
    ck_args = state.get("args")
    ck_args = vars(ck_args) if isinstance(ck_args, argparse.Namespace) else ck_args
    for part, ref in expected.items():
        got = strip_prefix(state[part]) if isinstance(state[part], dict) else None
        if got is None:
            raise CorruptCheckpointError(f"{path}: '{part}' is not a state dict")
        diff = sorted(set(ref) ^ set(got))
        bad = [f"{k} {tuple(got[k].shape)} (this run: {tuple(ref[k].shape)})"
               for k in ref if k in got and tuple(got[k].shape) != tuple(ref[k].shape)]
        if diff or bad:
            what = "; ".join(([f"keys only on one side: {diff[:6]}"] if diff else [])
                             + ([f"shapes differ: {bad[:4]}"] if bad else []))
            raise IncompatibleCheckpointError(
                f"checkpoint {path} does not fit this model ({part}: {what}). It was written "
                f"with {_arch_summary(ck_args)}; this run has {_arch_summary(run_args)}. Use "
                f"the flags of that run, or another --output_dir / --resume false to start "
                f"over.")
    for part in ("student", "teacher", "ibot_loss", "optimizer"):
        for name, t in _tensors(state[part], part):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CorruptCheckpointError(f"{path}: non-finite values in {name}")
    try:
        epoch = int(state["epoch"])
    except (TypeError, ValueError, OverflowError):
        epoch = -1
    if epoch < 0:
        raise CorruptCheckpointError(f"{path}: 'epoch' is {state['epoch']!r}")


def _tensors(obj, prefix: str):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def load_verified(paths: list[str], expected: dict, map_location="cpu", log=print,
                  run_args: dict | None = None, convert=None) -> tuple[str, dict]:
    """The newest of ``paths`` that loads and verifies; each rejected one is reported.
    ``convert`` (e.g. reference layout -> ours) runs on each loaded state before the checks.

    A corrupt file falls back to the next; an incompatible one (another model) is an error at
    once: an older file of the same directory would not fit either, and starting over silently
    would overwrite the user's run.
    """
    problems = []
    for path in paths:
        try:
            state = load_checkpoint(path, map_location=map_location)
            if convert is not None:
                state = convert(state)
            verify_checkpoint(state, expected, path, run_args)
        except IncompatibleCheckpointError:
            raise
        except CorruptCheckpointError as err:
            problems.append(str(err))
        except Exception as err:  # truncated zip, bad pickle, I/O error: all mean "unusable"
            problems.append(f"{path}: unreadable ({type(err).__name__}: {err})")
        else:
            if problems:
                log(f"WARNING: falling back to {path} (epoch {state['epoch']}): the newer "
                    f"checkpoint(s) reported above are unusable")
            return path, state
        log(f"WARNING: checkpoint {problems[-1]}")
    raise CorruptCheckpointError(
        "no usable checkpoint: " + "; ".join(problems) + ". Delete or move these files to "
        "start over (or point --load_from at a good copy).")


def find_resume_path(output_dir: str, load_from: str | None, resume: bool) -> str | None:
    """``--load_from`` (relative to output_dir, as in the reference) or the auto checkpoint."""
    if load_from:
        path = load_from if os.path.isabs(load_from) else os.path.join(output_dir, load_from)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load_from {load_from!r}: {path!r} does not exist")
        return path
    path = os.path.join(output_dir, "checkpoint.pth")
    return path if resume and os.path.isfile(path) else None
