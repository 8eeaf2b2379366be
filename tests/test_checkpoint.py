"""Checkpoint files (``ibot_fast/checkpoint.py``): keep-last-K rotation, fallback past corrupt
files (truncated, NaN, a flipped bit), moving corrupt files aside, a full disk (faked and, where
root can mount a small tmpfs, real), stale temporary files, files of another model, exports
that own their tensors. Trainer-level faults are in ``tests/test_reliability.py``."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from ibot_fast import checkpoint as ckpt
from ibot_fast.config import parse_args
from ibot_fast.train import Trainer
from helpers import TINY
from helpers import load_checkpoint, flip_bit


def _trainer(tmp_path, *extra):
    return Trainer(parse_args(TINY + ["--data_path", "synthetic:16", "--output_dir",
                                      str(tmp_path), *extra]))


# ------------------------------------------------------------------------ rotation, fallback
def test_keep_last_k_and_fall_back_past_corrupt_files(tmp_path, capsys):
    tr = _trainer(tmp_path, "--keep_checkpoints", "3")
    for epoch in (1, 2, 3, 4):
        tr.save(epoch)
    names = sorted(p.name for p in tmp_path.glob("checkpoint*.pth"))
    assert names == ["checkpoint.1.pth", "checkpoint.2.pth", "checkpoint.pth"]
    assert [load_checkpoint(tmp_path / n)["epoch"] for n in
            ("checkpoint.pth", "checkpoint.1.pth", "checkpoint.2.pth")] == [4, 3, 2]
    # newest truncated, the previous one with a NaN: both reported, the third one used
    data = (tmp_path / "checkpoint.pth").read_bytes()
    (tmp_path / "checkpoint.pth").write_bytes(data[: len(data) // 3])
    s = load_checkpoint(tmp_path / "checkpoint.1.pth")
    s["teacher"]["backbone.cls_token"][0, 0, 0] = float("nan")
    torch.save(s, tmp_path / "checkpoint.1.pth")
    tr2 = _trainer(tmp_path, "--keep_checkpoints", "3")
    tr2.load(ckpt.resume_candidates(str(tmp_path), 3))
    assert tr2.start_epoch == 2
    text = capsys.readouterr().out
    assert "checkpoint.pth: unreadable" in text
    assert "checkpoint.1.pth: non-finite values in teacher.backbone.cls_token" in text
    assert "falling back to" in text and "checkpoint.2.pth (epoch 2)" in text
    # nothing usable at all: an error, not a silent fresh start
    (tmp_path / "checkpoint.2.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CorruptCheckpointError, match="no usable checkpoint"):
        _trainer(tmp_path).train()


def test_bit_flip_and_nonfinite_optimizer_state_are_corrupt(tmp_path, capsys):
    """One flipped bit in a teacher tensor's data (``torch.load`` reads it without complaint)
    fails the zip CRC check; a NaN in AdamW's state is corrupt too: both fall back, naming the
    file and the damaged entry."""
    tr = _trainer(tmp_path, "--keep_checkpoints", "3")
    for epoch in (1, 2, 3):
        tr.save(epoch)
    flip_bit(tmp_path / "checkpoint.pth", "teacher", "backbone.blocks.0.attn.qkv.weight")
    s = load_checkpoint(tmp_path / "checkpoint.1.pth")
    cls = s["student"]["backbone.cls_token"]  # AdamW's state of a parameter, one value NaN
    s["optimizer"]["state"][0] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(cls),
                                  "exp_avg_sq": torch.full_like(cls, float("nan"))}
    torch.save(s, tmp_path / "checkpoint.1.pth")
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch in entry"):
        ckpt.verify_crc(str(tmp_path / "checkpoint.pth"))
    rejected = []
    path, state = ckpt.load_verified(ckpt.resume_candidates(str(tmp_path), 3), {},
                                     rejected=rejected)
    text = capsys.readouterr().out
    assert path.endswith("checkpoint.2.pth") and state["epoch"] == 1
    assert rejected == [str(tmp_path / "checkpoint.pth"), str(tmp_path / "checkpoint.1.pth")]
    assert "checkpoint.pth: checksum mismatch in entry" in text
    assert "checkpoint.1.pth: non-finite values in optimizer.state.0.exp_avg_sq" in text


def test_quarantine_and_compact_keep_good_files_only(tmp_path):
    """After a fallback the corrupt files go aside (``.corrupt-<time>``) and the good ones are
    renumbered from ``checkpoint.pth``: the next rotations count good files only."""
    base = str(tmp_path / "checkpoint.pth")
    for k, text in enumerate([b"bad0", b"bad1", b"good2", b"good3"]):
        with open(ckpt.rotated_name(base, k), "wb") as f:
            f.write(text)
    moved = ckpt.quarantine([base, ckpt.rotated_name(base, 1)], log=lambda m: None)
    assert [open(p, "rb").read() for p in moved] == [b"bad0", b"bad1"]
    assert all(".pth.corrupt-" in p for p in moved)
    assert ckpt.compact(base, keep=4) == [(ckpt.rotated_name(base, 2), base),
                                          (ckpt.rotated_name(base, 3),
                                           ckpt.rotated_name(base, 1))]
    assert ckpt.resume_candidates(str(tmp_path), 4) == [base, ckpt.rotated_name(base, 1)]
    assert open(base, "rb").read() == b"good2"
    ckpt.save_rotating({"x": torch.ones(1)}, base, keep=3)
    assert open(ckpt.rotated_name(base, 1), "rb").read() == b"good2"
    assert open(ckpt.rotated_name(base, 2), "rb").read() == b"good3"


def test_lowering_keep_drops_surplus_and_stale_tmp_is_removed(tmp_path):
    tr = _trainer(tmp_path, "--keep_checkpoints", "3")
    for epoch in (1, 2, 3):
        tr.save(epoch)
    (tmp_path / ".tmp_crashed.pth").write_bytes(b"half")
    tr = _trainer(tmp_path, "--keep_checkpoints", "1", "--epochs", "3")
    tr.train()  # resumes at epoch 3 = done; the stale temp file is cleaned up
    tr.save(3)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint.pth"]


def test_mismatched_arch_names_both_configurations(tmp_path):
    _trainer(tmp_path).save(1)
    tr = _trainer(tmp_path, "--arch", "vit_small")
    with pytest.raises(ckpt.IncompatibleCheckpointError) as exc:
        tr.train()
    msg = str(exc.value)
    assert "does not fit this model" in msg
    assert "--arch vit_tiny" in msg and "--arch vit_small" in msg
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 1  # not overwritten


def test_load_from_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ckpt.CorruptCheckpointError, match="bad.pth: unreadable"):
        _trainer(tmp_path, "--load_from", "bad.pth").train()


# ------------------------------------------------------------------------------- full disk
def test_full_disk_keeps_previous_checkpoints(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.save(1)
    tr.save(2)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pth")}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError) as exc:
        tr.save(3)
    msg = str(exc.value)
    assert exc.value.errno == errno.ENOSPC
    assert "No space left on device" in msg and "previous checkpoints there are intact" in msg
    assert str(tmp_path) in msg
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary left behind


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where it cannot be mounted), unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _mib(n: float) -> dict:
    return {"w": torch.ones(int(n * 2**20) // 4, dtype=torch.float32)}


def test_real_enospc_gives_the_message_and_keeps_the_previous_file(small_tmpfs):
    """A real full disk: torch.save turns the ENOSPC into ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; the writer records the OSError and raises the
    documented message instead, with the previous checkpoint intact and no temporary left."""
    path = str(small_tmpfs / "checkpoint.pth")
    ckpt.save_rotating(_mib(1.5), path, keep=1)
    good = open(path, "rb").read()
    with pytest.raises(OSError) as exc:  # 3 MiB do not fit in the 2.5 left
        ckpt.save_rotating(_mib(3), path, keep=1)
    assert exc.value.errno == errno.ENOSPC
    assert "No space left on device" in str(exc.value)
    assert "previous checkpoints there are intact" in str(exc.value)
    assert os.listdir(small_tmpfs) == ["checkpoint.pth"]
    assert open(path, "rb").read() == good


def test_space_checked_before_writing(small_tmpfs):
    """Less free space than the last checkpoint's size: with --keep_checkpoints 2 the oldest
    file (which the rotation would drop anyway) is deleted first and the save goes through;
    with 1 the save is refused before anything is written, saying how much is free."""
    path = str(small_tmpfs / "checkpoint.pth")
    ckpt.save_rotating(_mib(1.5), path, keep=2)
    ckpt.save_rotating(_mib(1.5), path, keep=2)  # checkpoint.pth + checkpoint.1.pth
    logged = []
    ckpt.save_rotating(_mib(1.5), path, keep=2, log=logged.append)
    assert "deleting the oldest kept one" in logged[0] and "checkpoint.1.pth" in logged[0]
    assert sorted(os.listdir(small_tmpfs)) == ["checkpoint.1.pth", "checkpoint.pth"]
    os.remove(ckpt.rotated_name(path, 1))
    with open(small_tmpfs / "filler", "wb") as f:  # leave less than 1.5 MiB free
        f.write(b"\0" * int(1.8 * 2**20))
    with pytest.raises(OSError) as exc:
        ckpt.save_rotating(_mib(1.5), path, keep=1)
    assert exc.value.errno == errno.ENOSPC and "MiB free" in str(exc.value)
    assert "--keep_checkpoints 1" in str(exc.value)
    assert sorted(os.listdir(small_tmpfs)) == ["checkpoint.pth", "filler"]


# ------------------------------------------------------------------------- shared storage
def test_own_storage_clones_views_only():
    flat = torch.arange(10.0)
    whole = torch.ones(3)
    out = ckpt.own_storage({"a": flat[2:5], "b": [whole, (flat[:1],)], "n": 3})
    assert out["a"].untyped_storage().nbytes() == 3 * 4 and torch.equal(out["a"], flat[2:5])
    assert out["b"][0] is whole and out["b"][1][0].untyped_storage().nbytes() == 4
    assert out["n"] == 3
