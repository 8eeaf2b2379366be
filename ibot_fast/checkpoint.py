"""Checkpoints: atomic writes, reference-compatible keys, resume.

Layout (reference §7.3): ``student``, ``teacher``, ``optimizer``, ``epoch`` (epochs completed),
``args``, ``ibot_loss`` (``center``, ``center2``), ``fp16_scaler``. Differences, on purpose:
``args`` is stored as a plain dict (so ``torch.load(weights_only=True)`` opens our files), and
student keys carry no DDP ``module.`` prefix (a reference checkpoint's prefix is stripped on load).
A file is written to a temporary name in the same directory, flushed and fsync'd, then renamed
over the old one: a crash mid-write never leaves a truncated ``checkpoint.pth``. The file is a
zip archive with a CRC-32 per entry (``torch.save``'s format); ``torch.load`` does not check
them, so ``load_verified`` does: a flipped bit anywhere in the tensor data makes the file
"corrupt", like a truncated one.

Rolling history (``--keep_checkpoints K``): ``checkpoint.pth`` is the newest, ``checkpoint.1.pth``
the one before, ... ``checkpoint.{K-1}.pth``. The new file is written completely before anything
is rotated, so a failed write (a full disk) leaves every existing checkpoint as it was. On resume
each candidate is verified (readable, expected keys, shapes of this run's model, finite values);
a corrupt one is reported and the next older one is used. After such a fallback the trainer moves
the corrupt files aside (``checkpoint.pth.corrupt-<time>``, ``quarantine``) and renumbers the
good ones (``compact``), so rotation never turns a corrupt file into ``checkpoint.1.pth`` and
``--keep_checkpoints`` counts good files only.

A full disk: the free space is compared with the size of the last checkpoint before writing
(``ensure_space``); where ``--keep_checkpoints`` lets the oldest file go anyway it is deleted
first, else the save is refused before anything is written. A write that still hits ``ENOSPC``
(or ``EDQUOT``) raises ``OSError`` with a message saying that nothing was replaced.
"""
from __future__ import annotations

import argparse
import errno
import glob
import os
import tempfile
import time
import zipfile

import torch

REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "ibot_loss")


class CorruptCheckpointError(RuntimeError):
    """The file cannot be used (unreadable, truncated, keys missing, non-finite values)."""


class IncompatibleCheckpointError(ValueError):
    """The file is sound but belongs to another model (``--arch``, ``--patch_size``, ...)."""


TMP_PREFIX = ".tmp_"


class _RecordingWriter:
    """A binary file that remembers the ``OSError`` its ``write`` raised: ``torch.save``
    replaces it with ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def full_disk_cause(err: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` behind ``err`` (itself or a cause), if any."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def full_disk_error(directory: str, code: int, detail: str = "") -> OSError:
    return OSError(code, f"cannot write a checkpoint in {directory!r}: {os.strerror(code)}"
                   f"{detail}. Nothing was replaced: the previous checkpoints there are intact. "
                   f"Free some space (or lower --keep_checkpoints / --saveckp_freq) and run the "
                   f"same command again to resume.")


def _write_tmp(obj, directory: str) -> str:
    """``obj`` fully written and fsync'd to a temporary file in ``directory``; its path."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pth", dir=directory)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = full_disk_cause(err) or (writer is not None and full_disk_cause(writer.error))
        if full:
            raise full_disk_error(directory, full.errno) from err
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


def free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def ensure_space(path: str, keep: int, log=print, needed: int | None = None) -> None:
    """Make sure a checkpoint about the size of ``path``'s current file fits next to it.

    If it does not, the oldest kept file (the one this save would drop anyway, ``keep`` > 1) is
    deleted first; if that is not enough, ``OSError(ENOSPC)`` before anything is written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if needed is None:
        if not os.path.isfile(path):
            return
        needed = os.path.getsize(path)
    free = free_bytes(directory)
    if free is None or free >= needed:
        return
    oldest = rotated_name(path, keep - 1) if keep > 1 else None
    if oldest is not None and os.path.isfile(oldest):
        log(f"WARNING: {free / 2**20:.1f} MiB free in {directory!r}, the last checkpoint has "
            f"{needed / 2**20:.1f} MiB: deleting the oldest kept one, {oldest}, first (the "
            f"rotation would drop it anyway)")
        os.remove(oldest)
        free = free_bytes(directory) or 0
        if free >= needed:
            return
    raise full_disk_error(directory, errno.ENOSPC,
                          f" ({free / 2**20:.1f} MiB free, the last checkpoint has "
                          f"{needed / 2**20:.1f} MiB; with --keep_checkpoints {keep} no older "
                          f"file may be deleted to make room)")


def save_rotating(obj, path: str, keep: int = 1, log=print):
    """Write ``obj`` to ``path`` atomically, keeping the ``keep - 1`` previous files as
    ``path``'s ``.1`` (newest) ... ``.{keep-1}`` (oldest) siblings."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    directory = os.path.dirname(os.path.abspath(path))
    ensure_space(path, keep, log)
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


def quarantine(paths: list[str], log=print) -> list[str]:
    """Move corrupt checkpoints aside as ``<name>.corrupt-<UTC time>``: kept for inspection,
    never again a resume candidate nor rotated into a good file's place."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = []
    for p in paths:
        if not os.path.isfile(p):
            continue
        dst = f"{p}.corrupt-{stamp}"
        os.replace(p, dst)
        moved.append(dst)
        log(f"moved the corrupt checkpoint {p} aside to {dst}")
    return moved


def compact(path: str, keep: int) -> list[tuple[str, str]]:
    """Renumber ``path`` and its rotated siblings that exist so they are contiguous from
    ``path`` itself (the newest good file becomes ``checkpoint.pth``); returns the renames."""
    existing = [rotated_name(path, k) for k in range(max(keep, 1) + 63)]
    existing = [p for p in existing if os.path.isfile(p)]
    renames = []
    for k, p in enumerate(existing):
        want = rotated_name(path, k)
        if p != want:
            os.replace(p, want)
            renames.append((p, want))
    if renames:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return renames


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


def verify_crc(path: str) -> None:
    """``CorruptCheckpointError`` naming the first zip entry whose CRC-32 does not match (a
    flipped bit), or when the archive cannot be read. Pre-zip (legacy) files are not checked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") \
            from err
    if bad is not None:
        raise CorruptCheckpointError(f"{path}: checksum mismatch in entry {bad!r} (the file "
                                     f"was changed after it was written)")


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
            "head_bottleneck_dim", "global_crops_size", "use_masked_im_modeling", "window_size")
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
                  run_args: dict | None = None, convert=None,
                  rejected: list | None = None) -> tuple[str, dict]:
    """The newest of ``paths`` that loads and verifies; each rejected one is reported (and
    appended to ``rejected``). Checked: the zip CRCs, keys, shapes, finite values.
    ``convert`` (e.g. reference layout -> ours) runs on each loaded state before the checks.

    A corrupt file falls back to the next; an incompatible one (another model) is an error at
    once: an older file of the same directory would not fit either, and starting over silently
    would overwrite the user's run.
    """
    problems = []
    for path in paths:
        try:
            verify_crc(path)
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
        if rejected is not None:
            rejected.append(path)
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


def nonfinite_tensor(state: dict, parts=("student", "teacher", "optimizer", "ibot_loss")):
    """The name of the first floating-point tensor with a NaN or an inf in ``state``, or None."""
    for part in parts:
        if part in state:
            for name, t in _tensors(state[part], part):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return name
    return None


def own_storage(obj):
    """``obj`` with every tensor that is a view into a larger storage (e.g. the flat EMA
    buffer of the fast step) cloned: ``torch.save`` writes a view's whole storage, so a
    "backbone" file of views would carry the head's bytes too."""
    if isinstance(obj, torch.Tensor):
        if obj.untyped_storage().nbytes() != obj.numel() * obj.element_size():
            return obj.clone()
        return obj
    if isinstance(obj, dict):
        return {k: own_storage(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [own_storage(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(own_storage(v) for v in obj)
    return obj
