"""Faults: preemption signals, a rank dying under torchrun, non-finite steps, corrupt or
incompatible checkpoints, a full disk, bad data and bad flags. Each test is one row of the
README's fault table. Exactness tests run in fp64 with deterministic algorithms and drop path
on (so the RNG states in a mid-epoch checkpoint matter), and compare with ``torch.equal``."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DistributedSampler

from ibot_fast import checkpoint as ckpt
from ibot_fast.config import parse_args
from ibot_fast.reliability import (EXIT_NONFINITE, EXIT_PREEMPTED, ResumableDistributedSampler,
                                   TrainingStopped)
from ibot_fast.train import Trainer, main
from test_train import REPO, TINY, _read

# 16 synthetic images, batch 4: 4 steps per epoch, 2 epochs.
EXACT = TINY + ["--data_path", "synthetic:16", "--epochs", "2", "--precision", "fp64",
                "--deterministic", "true"]


def exact_argv(out, *extra):
    return EXACT + ["--output_dir", str(out), *extra]


def states_equal(a: dict, b: dict):
    """Student, teacher, centres and optimiser state bit for bit."""
    for key in ("student", "teacher", "ibot_loss"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    main(exact_argv(out))
    return out


def _with_hook(tr: Trainer, hook):
    real = tr.train_step

    def step(images, masks, epoch, it):
        out = real(images, masks, epoch, it)
        hook(it)
        return out

    tr.train_step = step


# ------------------------------------------------------------------------------ preemption
def test_signal_mid_epoch_then_resume_equals_straight_run(tmp_path, straight):
    """SIGUSR1 during iteration 1 (step 2 of 4 in epoch 0, 2 persistent loader workers): the
    step finishes, a checkpoint with the sample position and the RNG states is written, exit
    code 75; the same command resumes at iteration 2 and ends bit-identical to the
    uninterrupted run (the kill -TERM test below covers 0 workers)."""
    argv = exact_argv(tmp_path, "--num_workers", "2")
    tr = Trainer(parse_args(argv))
    handler_before = signal.getsignal(signal.SIGUSR1)
    _with_hook(tr, lambda it: it == 1 and os.kill(os.getpid(), signal.SIGUSR1))
    with pytest.raises(TrainingStopped) as exc:
        tr.train()
    assert exc.value.code == EXIT_PREEMPTED == 75
    state = load(tmp_path / "checkpoint.pth")
    pos = state["position"]
    assert (state["epoch"], pos["epoch"], pos["steps"], pos["samples"]) == (0, 0, 2, 8)
    assert len(pos["rng"]) == 1 and pos["metric_steps"] == 2
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # restored after train()
    del tr

    main(argv)
    states_equal(load(tmp_path / "checkpoint.pth"), load(straight / "checkpoint.pth"))
    a, b = _read(straight / "steps.jsonl"), _read(tmp_path / "steps.jsonl")
    assert [r["it"] for r in b] == list(range(8))  # no step lost, none repeated
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ea, eb = _read(straight / "log.txt"), _read(tmp_path / "log.txt")
    assert [e["epoch"] for e in eb] == [0, 1]
    for x, y in zip(ea, eb):  # the epoch means carry over the saved partial sums
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-12)


@pytest.mark.slow
def test_kill_term_from_outside_then_resume(tmp_path, straight):
    """``kill -TERM`` on a real training process: exit 75 with a mid-epoch checkpoint; running
    the same command again finishes with the weights of the uninterrupted run."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "ibot_fast.train", *exact_argv(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    steps = out / "steps.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if steps.is_file() and len(_read(steps)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    log_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, log_text[-3000:]
    assert "SIGTERM received" in log_text and "preempted" in log_text
    stopped_at = load(out / "checkpoint.pth")
    main(exact_argv(out))
    states_equal(load(out / "checkpoint.pth"), load(straight / "checkpoint.pth"))
    assert [r["it"] for r in _read(steps)] == list(range(8))
    pos = stopped_at["position"]  # None: the signal came in an epoch's last step
    assert (pos["steps"] if pos else 0) + 4 * stopped_at["epoch"] in range(2, 8)


# ------------------------------------------------------------------- elastic (torchrun)
ELASTIC_SCRIPT = """
import os, signal, sys
import torch
from ibot_fast import train

rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
real_step = train.Trainer.train_step


def step(self, images, masks, epoch, it):
    if rank == 1 and it == {nan_it}:  # a NaN loss on rank 1 only, for this step
        for name in ("forward", "forward_selected"):  # --step reference / fast
            def poisoned(*a, _real=getattr(self.ibot_loss, name), **k):
                terms = dict(_real(*a, **k))
                terms["loss"] = terms["loss"] * float("nan")
                return terms

            setattr(self.ibot_loss, name, poisoned)
    try:
        out = real_step(self, images, masks, epoch, it)
    finally:
        self.ibot_loss.__dict__.pop("forward", None)
        self.ibot_loss.__dict__.pop("forward_selected", None)
    if rank == 1 and attempt == 0 and it == {kill_it}:
        # the newest checkpoint is damaged as the rank dies
        path = os.path.join(self.args.output_dir, "checkpoint.pth")
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return out


train.Trainer.train_step = step
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_rank_killed_restarts_from_previous_checkpoint(tmp_path):
    """2 ranks under ``torchrun --max_restarts 1``. Rank 1 gets a NaN gradient in epoch 0
    (``--on_nan skip``: both ranks skip that step) and is SIGKILLed in epoch 2 right after
    truncating checkpoint.pth. The restarted group detects the truncated file, resumes from
    checkpoint.1.pth (epoch 1) and finishes; the result equals one process with the same global
    batch that skipped the same step (fp64, drop path off)."""
    nan_it, kill_it = 1, 2 * 4 + 1  # 4 steps per epoch
    script = tmp_path / "faulty_train.py"
    script.write_text(ELASTIC_SCRIPT.format(nan_it=nan_it, kill_it=kill_it))
    common = TINY + ["--data_path", "synthetic:16", "--epochs", "3", "--drop_path", "0",
                     "--precision", "fp64", "--on_nan", "skip"]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--max_restarts", "1", str(script), *common, "--batch_size_per_gpu", "2",
           "--output_dir", str(out)]
    # pytorch#135712: without this the restarted group reads the dead group's gloo addresses
    # from the store torchrun shares with it, and hangs (README, Faults)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    assert "falling back to" in text and "checkpoint.1.pth (epoch 1)" in text, text[-4000:]
    assert "checkpoint.pth: unreadable" in text
    assert ("skipped non-finite step: epoch 0, iteration 1: loss non-finite on rank(s) [1], "
            "gradients non-finite on rank(s) [0, 1]") in text
    epochs = _read(out / "log.txt")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert [e["train_skipped"] for e in epochs] == [1, 0, 0]
    two = load(out / "checkpoint.pth")
    assert two["epoch"] == 3 and two["position"] is None

    # the same run in one process (global batch 4), skipping the same step
    one_dir = tmp_path / "one"
    tr = Trainer(parse_args(common + ["--batch_size_per_gpu", "4", "--output_dir",
                                      str(one_dir)]))
    _nan_grad_at(tr, nan_it)  # a NaN gradient: skipped like the NaN loss above
    tr.train()
    one = load(one_dir / "checkpoint.pth")
    for key in ("student", "teacher", "ibot_loss"):
        for k in one[key]:
            torch.testing.assert_close(two[key][k], one[key][k], rtol=1e-8, atol=1e-10,
                                       msg=f"{key}.{k}")


# -------------------------------------------------------------------------- non-finite
def _nan_grad_at(tr: Trainer, at_it: int):
    """A NaN gradient (finite loss) on the [CLS] token at iteration ``at_it``."""
    real = tr.train_step

    def step(images, masks, epoch, it):
        h = (tr.student.backbone.cls_token.register_hook(lambda g: g * float("nan"))
             if it == at_it else None)
        try:
            return real(images, masks, epoch, it)
        finally:
            if h is not None:
                h.remove()

    tr.train_step = step


def test_on_nan_stop_at_the_logging_sync(tmp_path, monkeypatch):
    """A NaN gradient at iteration 5 (epoch 1, step 1) with --log_freq 4: no host sync per step,
    the run stops at the sync after step 3 with exit code 3, the message names iteration 5,
    the terms and the rank, and checkpoint.pth (epoch 1) stays finite and untouched."""
    argv = exact_argv(tmp_path, "--log_freq", "4")
    main(argv + ["--epochs", "1"])
    before = load(tmp_path / "checkpoint.pth")
    tr = Trainer(parse_args(argv))
    _nan_grad_at(tr, 5)
    syncs = []
    real_sync = tr.nonfinite.sync
    monkeypatch.setattr(tr.nonfinite, "sync", lambda *a: syncs.append(1) or real_sync(*a))
    steps_seen = []
    _with_hook(tr, steps_seen.append)
    with pytest.raises(TrainingStopped) as exc:
        tr.train()
    msg = str(exc.value)
    assert exc.value.code == EXIT_NONFINITE
    assert "iteration 5 (step 1 of the epoch) on rank(s) [0]" in msg
    assert "gradients are non-finite" in msg and "loss is " in msg and "cls " in msg
    assert steps_seen == [4, 5, 6, 7] and len(syncs) == 1  # one sync, at step 3
    after = load(tmp_path / "checkpoint.pth")
    assert after["epoch"] == 1
    states_equal(after, before)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint.pth"]


def test_on_nan_skip_changes_nothing_and_counts(tmp_path):
    """--on_nan skip: the poisoned steps leave weights, teacher, optimiser and centres exactly
    as they were, the run goes on, and log.txt / steps.jsonl count the skipped steps."""
    tr = Trainer(parse_args(exact_argv(tmp_path, "--on_nan", "skip", "--epochs", "1")))
    poisoned = {1, 2}
    real = tr.train_step
    snaps = {}

    def step(images, masks, epoch, it):
        h = None
        if it in poisoned:
            snaps[it] = tr.state_dict(epoch)
            snaps[it] = {k: _clone(v) for k, v in snaps[it].items()}
            h = tr.student.backbone.cls_token.register_hook(lambda g: g * float("nan"))
        try:
            return real(images, masks, epoch, it)
        finally:
            if h is not None:
                h.remove()
                states_equal(tr.state_dict(epoch), snaps[it])

    tr.train_step = step
    tr.train()
    epochs = _read(tmp_path / "log.txt")
    assert epochs[0]["train_skipped"] == 2 and epochs[0]["train_loss"] == epochs[0]["train_loss"]
    recs = _read(tmp_path / "steps.jsonl")
    assert [r["skipped"] for r in recs] == [0, 1, 2, 2]
    final = load(tmp_path / "checkpoint.pth")
    assert all(torch.isfinite(v).all() for v in final["student"].values())


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v


# -------------------------------------------------------------------------- checkpoints
def _trainer(tmp_path, *extra):
    return Trainer(parse_args(TINY + ["--data_path", "synthetic:16", "--output_dir",
                                      str(tmp_path), *extra]))


def test_keep_last_k_and_fall_back_past_corrupt_files(tmp_path, capsys):
    tr = _trainer(tmp_path, "--keep_checkpoints", "3")
    for epoch in (1, 2, 3, 4):
        tr.save(epoch)
    names = sorted(p.name for p in tmp_path.glob("checkpoint*.pth"))
    assert names == ["checkpoint.1.pth", "checkpoint.2.pth", "checkpoint.pth"]
    assert [load(tmp_path / n)["epoch"] for n in
            ("checkpoint.pth", "checkpoint.1.pth", "checkpoint.2.pth")] == [4, 3, 2]
    # newest truncated, the previous one with a NaN: both reported, the third one used
    data = (tmp_path / "checkpoint.pth").read_bytes()
    (tmp_path / "checkpoint.pth").write_bytes(data[: len(data) // 3])
    s = load(tmp_path / "checkpoint.1.pth")
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


def test_lowering_keep_drops_surplus_and_stale_tmp_is_removed(tmp_path):
    tr = _trainer(tmp_path, "--keep_checkpoints", "3")
    for epoch in (1, 2, 3):
        tr.save(epoch)
    (tmp_path / ".tmp_crashed.pth").write_bytes(b"half")
    tr = _trainer(tmp_path, "--keep_checkpoints", "1", "--epochs", "3")
    tr.train()  # resumes at epoch 3 = done; the stale temp file is cleaned up
    tr.save(3)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint.pth"]


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


def test_mismatched_arch_names_both_configurations(tmp_path):
    _trainer(tmp_path).save(1)
    tr = _trainer(tmp_path, "--arch", "vit_small")
    with pytest.raises(ckpt.IncompatibleCheckpointError) as exc:
        tr.train()
    msg = str(exc.value)
    assert "does not fit this model" in msg
    assert "--arch vit_tiny" in msg and "--arch vit_small" in msg
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1  # not overwritten


def test_load_from_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ckpt.CorruptCheckpointError, match="bad.pth: unreadable"):
        _trainer(tmp_path, "--load_from", "bad.pth").train()


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("n, world", [(16, 1), (17, 2), (33, 3)])
def test_resumable_sampler(n, world):
    """start 0 is DistributedSampler; any start: the ranks together take exactly the rest of
    the epoch's permutation, the same count each."""
    full = []
    for r in range(world):
        a = DistributedSampler(range(n), num_replicas=world, rank=r, seed=5)
        b = ResumableDistributedSampler(range(n), num_replicas=world, rank=r, seed=5)
        a.set_epoch(3), b.set_epoch(3)
        assert list(a) == list(b) and len(a) == len(b)
        full.append(list(b))
    perm = [full[i % world][i // world] for i in range(len(full[0]) * world)]
    for start in (0, 1, 5, 7):
        parts = []
        for r in range(world):
            s = ResumableDistributedSampler(range(n), num_replicas=world, rank=r, seed=5)
            s.set_epoch(3)
            s.set_start(start)
            parts.append(list(s))
            assert len(s) == len(parts[-1]) == (len(perm) - start) // world
        got = sorted(i for p in parts for i in p)
        want = perm[start: start + len(parts[0]) * world]
        assert got == sorted(want)


# --------------------------------------------------------------------------- bad input
def test_corrupt_image_and_empty_class_folder_train_through(tmp_path, caplog):
    from PIL import Image
    root = tmp_path / "data"
    for cls in ("a", "b", "empty"):
        (root / cls).mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (20, 20), (30 * i, 100, 200)).save(root / ("a" if i < 4 else "b")
                                                             / f"{i}.png")
    (root / "a" / "1.png").write_bytes(b"\x89PNG garbage")
    main(TINY + ["--data_path", str(root), "--output_dir", str(tmp_path / "out"),
                 "--epochs", "1"])
    assert any("1.png" in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records)
    assert load(tmp_path / "out" / "checkpoint.pth")["epoch"] == 1


@pytest.mark.parametrize("argv, needle", [
    (["--teacher_temp", "0"], "--teacher_temp must be > 0"),
    (["--warmup_teacher_patch_temp", "-0.04"], "--warmup_teacher_patch_temp must be > 0"),
    (["--local_crops_scale", "0", "0.4"], "local_crops_scale"),
    (["--global_crops_scale", "0.2", "1.5"], "global_crops_scale"),
    (["--pred_ratio", "-0.1"], "pred_ratio"),
    (["--momentum_teacher", "1.5"], "--momentum_teacher must be in [0, 1]"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    (["--on_nan", "ignore"], "invalid choice"),
    (["--lr", "nan"], "must be finite"),
])
def test_out_of_range_flags(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data_path", "synthetic"] + argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
