"""Benchmarks of the defaults a CPU user gets: precision, and the demo under a busy core.

    python -m pytest bench/bench_defaults.py --benchmark-only -q

* ``test_cpu_precision_default``: the same small run (vit_tiny/16 on 64-px crops, 2 + 4 crops,
  batch 8, one thread) as the default command line now runs it (``--precision auto``: fp32 on
  the CPU) and as it ran before precision followed the device (the reference's GPU default,
  fp16 autocast + GradScaler, now ``--use_fp16 true``). CPUs have no fast fp16 matmuls: autocast
  to fp16 there is an emulation, not a speed-up. Both variants in one run, on the default step
  and on ``--step reference``.
* ``test_demo_step_with_a_busy_core``: ``--preset demo`` (what ``make demo`` trains: its own
  loader workers, threads from the cores) for a shortened epoch, idle and with one process
  spinning on a core the whole time. ``extra_info["step_s"]`` is the median seconds per step
  from the trainer's own ``steps.jsonl`` (images/s of each logged interval, data loading
  included), so start-up and the k-NN are not in it. Run it on an otherwise idle machine: the
  point is the ratio of the two.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from ibot_fast.config import parse_args
from ibot_fast.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_RUN = ["--arch", "vit_tiny", "--patch_size", "16", "--global_crops_size", "64",
             "--local_crops_size", "32", "--local_crops_number", "4", "--batch_size_per_gpu",
             "8", "--out_dim", "8192", "--data_path", "synthetic:8", "--num_workers", "0",
             "--threads", "1", "--epochs", "100", "--progress", "false"]


def _batch(tr: Trainer):
    images, _, masks = next(iter(tr.loader))
    return images, masks


@pytest.mark.parametrize("step", ["fast", "reference"])
@pytest.mark.parametrize("precision", ["default", "fp16"])
def test_cpu_precision_default(benchmark, tmp_path, precision, step):
    torch.set_num_threads(1)
    extra = ["--use_fp16", "true"] if precision == "fp16" else []
    tr = Trainer(parse_args(SMALL_RUN + ["--output_dir", str(tmp_path), "--step", step,
                                         *extra]))
    benchmark.group = f"cpu small run vit_tiny/16 64px B=8 1 thread, --step {step}"
    images, masks = _batch(tr)
    it = tr.iters_per_epoch  # epoch 1: past the frozen last layer
    step_fn = lambda: tr.train_step(images, masks, 1, it)  # noqa: E731
    step_fn()  # warm-up
    benchmark.pedantic(step_fn, rounds=int(os.environ.get("IBOT_BENCH_ROUNDS", 3)),
                       warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(precision=tr.args.precision, step=step,
                                img_s=8 / benchmark.stats.stats.median,
                                threads=torch.get_num_threads())


DEMO_STEPS = 60


def _demo_step_seconds(out_dir) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "ibot_fast.train", "--preset", "demo", "--output_dir",
           str(out_dir), "--epochs", "1", "--max_steps_per_epoch", str(DEMO_STEPS),
           "--knn_eval", "false", "--log_freq", "5", "--progress", "false"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = REPO
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out_dir, "steps.jsonl")) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    with open(os.path.join(out_dir, "args.json")) as f:
        args = json.load(f)
    B = args["batch_size_per_gpu"]
    rates = [r["img_s"] for r in rows[1:] if r.get("img_s")]  # the first interval warms up
    return B / statistics.median(rates), {k: args[k] for k in ("num_workers", "threads",
                                                               "precision")}


@pytest.mark.parametrize("load", ["idle", "one_core_busy"])
def test_demo_step_with_a_busy_core(benchmark, tmp_path, load):
    spinner = None
    if load == "one_core_busy":
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    try:
        result = {}

        def run():
            result["step_s"], result["resolved"] = _demo_step_seconds(tmp_path / "demo")

        benchmark.group = f"demo preset, {DEMO_STEPS} steps, seconds per step"
        benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    benchmark.extra_info.update(load=load, step_s=result["step_s"], cores=os.cpu_count(),
                                **result["resolved"])
