"""Faults of a training run: preemption signals (to the process, to its whole process group,
under torchrun, before the first step and after the last epoch, Ctrl-C), a rank dying under
torchrun, non-finite steps, a bit flip in a checkpoint, rotation after a fallback, two trainers
on one directory, changed flags on resume, a full disk at preemption, bad data and bad flags.
Each test is one row of the README's fault table; file-level checkpoint tests are in
``tests/test_checkpoint.py``. Exactness tests run in fp64 with deterministic algorithms and
drop path on (so the RNG states in a mid-epoch checkpoint matter), and compare with
``torch.equal``."""
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
from ibot_fast.reliability import (EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED,
                                   ResumableDistributedSampler, TrainingStopped)
from ibot_fast.train import Trainer, main
from helpers import REPO, TINY, read_jsonl

# 16 synthetic images, batch 4: 4 steps per epoch, 2 epochs. One thread: the runs compared
# bit for bit (in this process and in children, idle or under load) reduce in one order.
EXACT = TINY + ["--data_path", "synthetic:16", "--epochs", "2", "--precision", "fp64",
                "--deterministic", "true", "--threads", "1"]


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
    a, b = read_jsonl(straight / "steps.jsonl"), read_jsonl(tmp_path / "steps.jsonl")
    assert [r["it"] for r in b] == list(range(8))  # no step lost, none repeated
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ea, eb = read_jsonl(straight / "log.txt"), read_jsonl(tmp_path / "log.txt")
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
        if steps.is_file() and len(read_jsonl(steps)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    log_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, log_text[-3000:]
    assert "SIGTERM received" in log_text and "preempted" in log_text
    stopped_at = load(out / "checkpoint.pth")
    main(exact_argv(out))
    states_equal(load(out / "checkpoint.pth"), load(straight / "checkpoint.pth"))
    assert [r["it"] for r in read_jsonl(steps)] == list(range(8))
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
    epochs = read_jsonl(out / "log.txt")
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
    epochs = read_jsonl(tmp_path / "log.txt")
    assert epochs[0]["train_skipped"] == 2 and epochs[0]["train_loss"] == epochs[0]["train_loss"]
    recs = read_jsonl(tmp_path / "steps.jsonl")
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


# ----------------------------------------------------- signals to the group, Ctrl-C, start/end
def _wait_for_steps(proc, steps, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if steps.is_file() and len(read_jsonl(steps)) >= n:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_then_resume(tmp_path, straight):
    """``kill -TERM -<pgid>`` (what a terminal or SLURM does) with 2 loader workers: the
    workers ignore it, the main process finishes the step, writes the checkpoint and exits 75;
    the rerun finishes every step, with the weights of the uninterrupted run (to 1e-6: one
    measured run differed in the last bits; the in-process SIGUSR1 test above checks
    bit-exactness with workers)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "ibot_fast.train", *exact_argv(out, "--num_workers", "2")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert _wait_for_steps(proc, out / "steps.jsonl", 2), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    log_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, log_text[-3000:]
    assert "preempted (SIGTERM)" in log_text and "killed by signal" not in log_text
    stopped_at = load(out / "checkpoint.pth")
    main(exact_argv(out, "--num_workers", "2"))
    a, b = load(out / "checkpoint.pth"), load(straight / "checkpoint.pth")
    for key in ("student", "teacher", "ibot_loss"):
        for k in b[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-6, atol=1e-8,
                                       msg=f"{key}.{k}")
    assert [r["it"] for r in read_jsonl(out / "steps.jsonl")] == list(range(8))
    pos = stopped_at["position"]  # None: the signal came in an epoch's last step
    assert (pos["steps"] if pos else 0) + 4 * stopped_at["epoch"] in range(2, 8)


@pytest.mark.slow
def test_sigterm_to_a_torchrun_group_with_workers(tmp_path):
    """``kill -TERM -<pgid>`` of ``torchrun --nproc_per_node 2`` with a loader worker per rank:
    torchrun, both ranks and their workers all get it; the ranks agree at the next sync, write
    one mid-epoch checkpoint and stop as preempted, no worker crash; the rerun finishes."""
    out = tmp_path / "run"
    common = TINY + ["--data_path", "synthetic:16", "--epochs", "2", "--drop_path", "0",
                     "--batch_size_per_gpu", "2", "--num_workers", "1", "--output_dir",
                     str(out)]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "ibot_fast.train", *common]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert _wait_for_steps(proc, out / "steps.jsonl", 2), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    log_text = proc.communicate(timeout=300)[0]
    assert "preempted (SIGTERM)" in log_text, log_text[-3000:]
    assert "killed by signal" not in log_text and "Traceback" not in log_text.split(
        "preempted (SIGTERM)")[0], log_text[-3000:]
    state = load(out / "checkpoint.pth")
    assert state["position"] is not None or state["epoch"] >= 1
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert load(out / "checkpoint.pth")["epoch"] == 2


def test_ctrl_c_is_a_preemption_with_exit_130_then_resume(tmp_path, straight, capsys):
    """The first SIGINT finishes the step, writes the mid-epoch checkpoint and exits 130 with
    one line naming it and how to resume; the rerun ends bit-identical to the straight run."""
    argv = exact_argv(tmp_path)
    tr = Trainer(parse_args(argv))
    _with_hook(tr, lambda it: it == 1 and os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingStopped) as exc:
        tr.train()
    assert exc.value.code == EXIT_INTERRUPTED == 130
    text = capsys.readouterr().out
    assert "SIGINT received: finishing the current step" in text
    assert (f"interrupted (SIGINT): checkpoint {tmp_path / 'checkpoint.pth'} holds the state "
            f"after step 2 of epoch 0. Run the same command again") in text
    assert "Traceback" not in text
    pos = load(tmp_path / "checkpoint.pth")["position"]
    assert (pos["epoch"], pos["steps"], pos["samples"]) == (0, 2, 8)
    del tr
    main(argv)
    states_equal(load(tmp_path / "checkpoint.pth"), load(straight / "checkpoint.pth"))
    assert [r["it"] for r in read_jsonl(tmp_path / "steps.jsonl")] == list(range(8))


def test_second_ctrl_c_stops_at_once(tmp_path, monkeypatch, capsys):
    """Ctrl-C twice: no waiting for the step or the checkpoint; exit 130 with one line."""
    from ibot_fast import train as train_mod
    real = train_mod.Trainer.train_step

    def step(self, images, masks, epoch, it):
        if it == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, images, masks, epoch, it)

    monkeypatch.setattr(train_mod.Trainer, "train_step", step)
    with pytest.raises(SystemExit) as exc:
        main(TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path)])
    assert exc.value.code == 130
    text = capsys.readouterr().out
    assert "interrupted again: stopped at once" in text and "no checkpoint was written" in text
    assert not list(tmp_path.glob("*.pth"))


def test_signal_before_the_first_step_and_after_the_last_epoch(tmp_path, monkeypatch, capsys):
    """SIGTERM while the run is being set up: exit 75 before any step, saying what is on disk.
    SIGTERM while the loss curve is drawn after the last epoch: stops at once with exit 75,
    saying the finished checkpoint is there (the rerun has nothing to do)."""
    from ibot_fast import train as train_mod
    argv = TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path), "--epochs", "1"]
    real_init = train_mod.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_PREEMPTED
    text = capsys.readouterr().out
    assert "preempted (SIGTERM): stopped before the first step; no checkpoint exists yet" in text
    assert not (tmp_path / "steps.jsonl").is_file() or not read_jsonl(tmp_path / "steps.jsonl")
    monkeypatch.setattr(train_mod.Trainer, "__init__", real_init)

    def plot(out):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the run at once")

    monkeypatch.setattr(train_mod, "plot_loss_curve", plot)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_PREEMPTED
    text = capsys.readouterr().out
    assert (f"SIGTERM after the last epoch: {tmp_path / 'checkpoint.pth'} holds the finished "
            f"run (epoch 1)") in text
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1
    main(argv)
    assert "already trained to epoch 1 (--epochs 1); nothing to do" in capsys.readouterr().out


def test_preemption_on_a_full_disk_still_exits_75(tmp_path, monkeypatch, capsys):
    """The mid-epoch checkpoint cannot be written (ENOSPC): exit 75 all the same, saying the
    position was not saved and which checkpoint the rerun resumes from."""
    argv = exact_argv(tmp_path, "--epochs", "2")
    main(argv[:-2] + ["--epochs", "1", "--output_dir", str(tmp_path)])
    tr = Trainer(parse_args(argv))
    real_save = ckpt.torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("position"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    _with_hook(tr, lambda it: it == 5 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingStopped) as exc:
        tr.train()
    assert exc.value.code == EXIT_PREEMPTED
    msg = str(exc.value)
    assert "stopped after step 2 of epoch 1, but its mid-epoch checkpoint could not be " \
           "written (No space left on device; free some space)" in msg
    assert f"The newest checkpoint, {tmp_path / 'checkpoint.pth'}, is finite" in msg
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1


# ------------------------------------------------------------------- one trainer per directory
HOLD_LOCK = """
import fcntl, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on host {socket.gethostname()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_two_trainers_on_one_output_dir(tmp_path, capsys):
    """A second trainer on a directory another one holds exits 2 before any work, naming the
    holder's pid and host; once the holder is dead, its left-over lock is taken over."""
    import socket
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path),
                       "--epochs", "1"]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"another trainer (pid {holder.pid} on host {socket.gethostname()}) is " \
               f"running on --output_dir" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # no work was done
    finally:
        holder.kill()
        holder.wait()
    main(argv)
    assert f"left by pid {holder.pid} on host" in capsys.readouterr().out
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert (tmp_path / ".lock").read_text() == ""  # released at the end


# ----------------------------------------------------------- nothing non-finite is ever saved
def test_on_nan_skip_never_saves_a_nonfinite_state(tmp_path):
    """A weight goes NaN in a step whose loss and gradients were finite (what a damaged
    optimiser state does): --on_nan skip does not see it, the epoch save refuses it, exit 3."""
    tr = Trainer(parse_args(exact_argv(tmp_path, "--on_nan", "skip", "--epochs", "1")))

    def poison(it):
        if it == 3:  # the epoch's last step
            with torch.no_grad():
                tr.student_without_ddp.backbone.pos_embed[0, 0, 0] = float("nan")

    _with_hook(tr, poison)
    with pytest.raises(TrainingStopped) as exc:
        tr.train()
    assert exc.value.code == EXIT_NONFINITE
    assert "non-finite values in student.backbone.pos_embed at the end of epoch 0" in \
        str(exc.value)
    assert not list(tmp_path.glob("*.pth"))


def test_on_nan_skip_of_most_steps_stops(tmp_path):
    """Every step non-finite under --on_nan skip: the run stops at the epoch's end (exit 3)
    instead of finishing "successfully", and saves nothing."""
    tr = Trainer(parse_args(exact_argv(tmp_path, "--on_nan", "skip", "--epochs", "1")))
    for it in range(4):
        _nan_grad_at(tr, it)
    with pytest.raises(TrainingStopped) as exc:
        tr.train()
    assert exc.value.code == EXIT_NONFINITE
    assert "--on_nan skip skipped 4 of the 4 steps of epoch 0 (more than 50%)" in str(exc.value)
    assert not list(tmp_path.glob("*.pth"))


# ------------------------------------------------------------------ corrupt files on resume
def test_bit_flip_in_teacher_data_falls_back_and_matches_straight_run(tmp_path, straight,
                                                                       capsys):
    """A flipped bit inside a teacher tensor of checkpoint.pth: the CRC check calls it corrupt,
    the run falls back to checkpoint.1.pth (epoch 1), redoes epoch 1 and ends bit-identical
    to the uninterrupted run."""
    from helpers import flip_bit
    main(exact_argv(tmp_path))
    flip_bit(tmp_path / "checkpoint.pth", "teacher", "backbone.blocks.0.attn.qkv.weight")
    capsys.readouterr()
    main(exact_argv(tmp_path))
    text = capsys.readouterr().out
    assert "checkpoint.pth: checksum mismatch in entry" in text
    assert "falling back to" in text and "checkpoint.1.pth (epoch 1)" in text
    states_equal(load(tmp_path / "checkpoint.pth"), load(straight / "checkpoint.pth"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "nan"])
def test_rotation_after_a_fallback_keeps_the_good_file(tmp_path, damage):
    """After falling back past a damaged checkpoint.pth and training on, checkpoint.1.pth is
    the good file the run resumed from (same bytes), and the damaged one is kept aside."""
    argv = TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path),
                   "--epochs", "2"]
    tr = Trainer(parse_args(argv))
    tr.save(1)
    tr.save(1)  # checkpoint.pth and checkpoint.1.pth: epoch 1
    del tr
    good = (tmp_path / "checkpoint.1.pth").read_bytes()
    bad = tmp_path / "checkpoint.pth"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:1000])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        s = load(bad)
        s["student"]["backbone.cls_token"][0, 0, 0] = float("inf")
        torch.save(s, bad)
    damaged = bad.read_bytes()
    main(argv)
    assert (tmp_path / "checkpoint.1.pth").read_bytes() == good
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 2
    aside = list(tmp_path.glob("checkpoint.pth.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged


# ------------------------------------------------------------------------ resumes say what changed
@pytest.fixture(scope="module")
def mid_epoch(tmp_path_factory):
    """A directory holding a mid-epoch checkpoint (SIGUSR1 after step 2 of 4 of epoch 0)."""
    out = tmp_path_factory.mktemp("mid")
    tr = Trainer(parse_args(exact_argv(out)))
    _with_hook(tr, lambda it: it == 1 and os.kill(os.getpid(), signal.SIGUSR1))
    with pytest.raises(TrainingStopped):
        tr.train()
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _load_with(out, *flags):
    tr = Trainer(parse_args(exact_argv(out, *flags)))
    tr.load(ckpt.resume_candidates(str(out), 2))
    return tr


def test_changed_epochs_and_finished_run(tmp_path, capsys):
    """--epochs 1 -> 2 on a finished 1-epoch run: one line naming both values and what is
    rebuilt, and training goes on; the same command again: 'nothing to do'."""
    argv = TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path)]
    main(argv + ["--epochs", "1"])
    capsys.readouterr()
    main(argv + ["--epochs", "1"])
    assert "already trained to epoch 1 (--epochs 1); nothing to do" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "log.txt")) == 1
    main(argv + ["--epochs", "2"])
    text = capsys.readouterr().out
    assert ("WARNING: resuming with a changed flag: --epochs 1 -> 2: the lr/wd/momentum and "
            "teacher-temperature schedules are rebuilt for 2 epochs from epoch 1") in text
    assert [e["epoch"] for e in read_jsonl(tmp_path / "log.txt")] == [0, 1]


def test_changed_seed_mid_epoch_is_named(tmp_path, mid_epoch, capsys):
    out = _copy(mid_epoch, tmp_path / "run")
    _load_with(out, "--seed", "1")
    text = capsys.readouterr().out
    assert ("--seed 0 -> 1: the data order, crops, masks and drop-path draws differ from here "
            "on; the rest of epoch 0 comes from another shuffle") in text


def test_changed_batch_mid_epoch_is_named_and_keeps_step_records(tmp_path, mid_epoch, capsys):
    """--batch_size_per_gpu 4 -> 8 at sample 8 of 16: named with its consequences; the
    records of the two steps already done stay in steps.jsonl."""
    out = _copy(mid_epoch, tmp_path / "run")
    main(exact_argv(out, "--batch_size_per_gpu", "8"))
    text = capsys.readouterr().out
    assert ("--batch_size_per_gpu 4 -> 8: the global batch is 8 instead of 4: the steps per "
            "epoch, the lr (scaled by global batch / 256) and the schedules are rebuilt from "
            "epoch 0; epoch 0 goes on from sample 8 (step 1 of the new batch)") in text
    recs = read_jsonl(out / "steps.jsonl")
    assert [r["it"] for r in recs[:2]] == [0, 1] and len(recs) == 2 + 1 + 2
    assert load(out / "checkpoint.pth")["epoch"] == 2


def test_another_dataset_size_mid_epoch_is_a_usage_error(tmp_path, mid_epoch, capsys):
    out = _copy(mid_epoch, tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        main(exact_argv(out, "--data_path", "synthetic:32"))
    assert exc.value.code == 2
    text = capsys.readouterr().out
    assert "stopped in the middle of epoch 0, at sample 8 of a 16-image dataset (--data_path " \
           "synthetic:16); this run's --data_path synthetic:32 has 32 images" in text
    assert "Traceback" not in text


def test_model_flag_change_is_refused(tmp_path, mid_epoch):
    out = _copy(mid_epoch, tmp_path / "run")
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="--norm_last_layer True -> "
                                                                "False"):
        _load_with(out, "--norm_last_layer", "false")


def test_resume_line_counts_the_redone_steps(tmp_path, capsys):
    """A crash (like a SIGKILL) after iteration 5, with checkpoint.pth at epoch 1: the resume
    line says 2 steps are redone and their steps.jsonl records replaced."""
    argv = exact_argv(tmp_path)
    tr = Trainer(parse_args(argv))

    def crash(it):  # in iteration 6, before its record is written
        if it == 6:
            raise RuntimeError("simulated crash")

    _with_hook(tr, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tr.train()
    del tr
    capsys.readouterr()
    _load_with(tmp_path)
    text = capsys.readouterr().out
    assert ("at epoch 1; the interrupted run had got to iteration 5: 2 step(s) after the "
            "checkpoint are redone and their 2 steps.jsonl record(s) replaced") in text
