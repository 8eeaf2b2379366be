#!/usr/bin/env python3
"""The first-tier GPU measurement: one command of at most 9.5 minutes, results as it goes.

    python3 bench/gpu/run_gpu.py                 # on a GPU machine, from the repo root
    python3 bench/gpu/run_gpu.py --dry-run       # the same plan on the CPU, tiny shapes
    python3 bench/gpu/run_gpu.py --plan          # the stages and their estimated seconds

It runs from the tree (the repo root goes on ``PYTHONPATH``; nothing is installed) and needs only
what a GPU machine with torch has: torch, triton, numpy, pytest. Stages, in order of value:

  env       GPU, driver, torch / triton / python versions, commit, date
  kernels   the flat EMA over ~22 M parameters, soft_ce and soft_ce_linear at K = 8192, D = 256
            (M ~ 7,500 patch rows and 768 [CLS] rows; bf16 and fp32) against their torch twins:
            max error, time, GB/s against the bandwidth bound, registers / spills as compiled
  step      ViT-S/16, recipe crops (2x224 + 10x96), K = 8192, bf16, B = 128: the default (fast)
            step, the fused-head variant, the reference path and the reference-style step:
            time, img/s, peak memory, FLOPs, MFU against 989 TFLOP/s dense bf16
  tests     pytest -m gpu (everything that needs no extra wheel), junit XML in $OUT
  mask_ext  the CUDA mask extension (built in the background from the start) and its gpu tests
  vit_base  ViT-B/16 at B = 64, default and reference step, if time is left

Every case appends one JSON line to ``$OUT/results.jsonl`` the moment it finishes::

    {"stage": ..., "case": ..., "status": "ok" | "failed" | "skipped" | "timeout" | "planned",
     "figures": {...}, "unmeasured": [...], "wall_s": ..., "time": ..., "dry_run": ...}

(``error`` / ``reason`` say why for a case that is not ok). The kernels, step and vit_base stages
run in child processes capped by the time left (``--budget-s``, 570 s by default), so a stage
that hangs or runs long is killed and its missing cases are written as ``timeout``: what ran
is kept. Timing: CUDA events, 2 warm-up runs, median of 10 (``--reps``). ``to_results.py`` turns
the file into ``bench/results/`` Markdown + JSON; ``bench/gpu/README.md`` has the command line.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUDGET_S = 570.0                  # 9.5 minutes: one device command is at most 10
PEAK_BF16_TFLOPS = 989.0          # H100 / H200 dense bf16 (datasheet)
PEAK_HBM_GBS = 4800.0             # H200 HBM3e (datasheet)
MEASURED_COPY_GBS = 4300.0        # device-to-device copy measured on an H200, read + write
EMA_PARAMS = 22_000_000           # about a ViT-S/16 teacher

# (name, estimated seconds on an H200, runs in a child process). The estimates sum to <= 570.
PLAN = [
    ("env", 10, False),
    ("kernels", 140, True),
    ("step", 170, True),
    ("tests", 130, False),
    ("mask_ext", 50, False),
    ("vit_base", 60, True),
]
# Cases each stage reports (a killed stage writes `timeout` for those it did not finish).
KERNEL_CASES = (["ema-fp32", "ema-fp32-bf16copy"]
                + [f"soft_ce-{dt}-{rows}" for dt in ("bf16", "fp32") for rows in ("patch", "cls")]
                + [f"soft_ce_linear-{dt}-{rows}" for dt in ("bf16", "fp32")
                   for rows in ("patch", "cls")])
STEP_VARIANTS = ("fast", "fast_fused", "reference", "refstyle")
STAGE_CASES = {
    "env": ["env"],
    "kernels": KERNEL_CASES,
    "step": [f"vit_small-{v}" for v in STEP_VARIANTS],
    "tests": ["pytest-gpu"],
    "mask_ext": ["build", "pytest-mask-ext"],
    "vit_base": ["vit_base-fast", "vit_base-reference"],
}
# The recipe shapes on the GPU; tiny ones for the CPU dry run (same code path).
STEP_CASES = {
    "vit_small": dict(arch="vit_small", g=224, l=96, nl=10, B=128, K=8192, hidden=2048, bd=256),
    "vit_base": dict(arch="vit_base", g=224, l=96, nl=10, B=64, K=8192, hidden=2048, bd=256),
}
DRY_STEP_CASE = dict(arch="vit_nano", g=32, l=16, nl=2, B=2, K=64, hidden=32, bd=16)
KERNEL_SHAPES = {"patch": dict(M=7500, T=7500, P=1), "cls": dict(M=768, T=128, P=2)}
DRY_KERNEL_SHAPES = {"patch": dict(M=40, T=40, P=1), "cls": dict(M=12, T=4, P=2)}


# ------------------------------------------------------------------------------ recording
class Recorder:
    """Appends one JSON line per finished case to ``results.jsonl`` (flushed at once)."""

    def __init__(self, out: Path, stage: str, dry_run: bool):
        self.path = out / "results.jsonl"
        self.stage, self.dry_run = stage, dry_run

    def emit(self, case, status, figures=None, unmeasured=(), wall_s=None, **extra):
        line = {"stage": self.stage, "case": case, "status": status,
                "figures": figures or {}, "unmeasured": list(unmeasured),
                "wall_s": None if wall_s is None else round(wall_s, 3),
                "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "dry_run": self.dry_run, **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
        print(f"run_gpu: {self.stage}/{case}: {status}", flush=True)
        return line

    def case(self, name, fn):
        """Run ``fn() -> (figures, unmeasured)`` and record it (a failure is a result)."""
        t0 = time.perf_counter()
        try:
            figures, unmeasured = fn()
        except Exception as err:  # noqa: BLE001 -- recorded, and the next case runs
            return self.emit(name, "failed", wall_s=time.perf_counter() - t0,
                             error=f"{type(err).__name__}: {str(err)[:2000]}")
        return self.emit(name, "ok", figures, unmeasured, wall_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- timing
class Ctx:
    def __init__(self, dry_run: bool, reps: int, warmup: int):
        import torch
        self.torch = torch
        self.dry_run = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.reps, self.warmup = reps, warmup

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time_ms(self, fn):
        """Median milliseconds of ``fn`` after the warm-up runs (CUDA events on the GPU)."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), times


# ------------------------------------------------------------------------------------ env
def stage_env(rec: Recorder, ctx: Ctx):
    def run():
        import platform
        torch = ctx.torch
        fig = {"python": platform.python_version(), "torch": torch.__version__,
               "torch_cuda": torch.version.cuda, "commit": _commit(),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}
        try:
            import triton
            fig["triton"] = triton.__version__
        except Exception as err:  # noqa: BLE001
            fig["triton"] = f"not importable ({err})"
        unmeasured = []
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            fig.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                       sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
        else:
            unmeasured.append("gpu")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            fig["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            fig["nvidia_smi"] = f"unavailable ({err})"
            unmeasured.append("driver")
        return fig, unmeasured
    rec.case("env", run)


def _commit() -> str:
    if os.environ.get("IBOT_GPU_COMMIT"):
        return os.environ["IBOT_GPU_COMMIT"]
    try:  # a device's copy of the tree has no .git: pass IBOT_GPU_COMMIT there
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() \
            or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# -------------------------------------------------------------------------------- kernels
def _triton_stats(ema: bool) -> dict:
    """Registers, spills and shared memory of every compiled variant of the Triton kernels of
    ``ibot_fast.kernels`` (the EMA's when ``ema``, the others' else), as the compiled kernels
    report them ({} where this Triton hides them)."""
    module_names = [n for n in list(sys.modules) if n.startswith("ibot_fast.kernels")
                    and ("ema" in n) == ema]
    out = {}
    for mod_name in module_names:
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        for name, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for entry in caches.values():
                kernels = next((c for c in (entry if isinstance(entry, tuple) else (entry,))
                                if isinstance(c, dict)), {})
                for k, compiled in enumerate(kernels.values()):
                    meta = getattr(compiled, "metadata", None)
                    out[f"{name}#{k}"] = {
                        "n_regs": getattr(compiled, "n_regs", None),
                        "n_spills": getattr(compiled, "n_spills", None),
                        "shared_B": getattr(meta, "shared", None),
                        "num_warps": getattr(meta, "num_warps", None),
                        "num_stages": getattr(meta, "num_stages", None)}
    return out


def _fast_backend(ctx: Ctx) -> str:
    return "triton" if ctx.cuda else "auto"  # the CPU dry run: the torch back end


def stage_kernels(rec: Recorder, ctx: Ctx):
    torch = ctx.torch
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)

    def ema_case(bf16_copy):
        def run():
            n = 3 * 4096 + 17 if ctx.dry_run else EMA_PARAMS
            t = torch.randn(n, device=dev, generator=gen)
            s = torch.randn(n, device=dev, generator=gen)
            t16 = torch.empty(n, device=dev, dtype=torch.bfloat16) if bf16_copy else None
            want = t.clone().lerp_(s, 1 - 0.996)
            if ctx.cuda or os.environ.get("TRITON_INTERPRET") == "1":
                from ibot_fast.kernels.ema_triton import ema_flat_
                fast = lambda: ema_flat_(t.copy_(t0), s, 0.996, t16)  # noqa: E731
                backend = "triton"
            else:
                fast = lambda: t.copy_(t0).lerp_(s, 1 - 0.996)  # noqa: E731
                backend = "torch (no triton here)"
            t0 = t.clone()
            fast()
            err = (t - want).abs().max().item()
            # the timed op includes the reset copy: time the copy alone and subtract it
            copy_ms, _ = ctx.time_ms(lambda: t.copy_(t0))
            total_ms, _ = ctx.time_ms(fast)
            ms = max(total_ms - copy_ms, 1e-6)
            ref_ms, _ = ctx.time_ms(lambda: t.copy_(t0).lerp_(s, 1 - 0.996))
            nbytes = n * (12 + (2 if bf16_copy else 0))  # read t, s; write t (+ bf16 copy)
            gbs = nbytes / ms / 1e6
            fig = {"backend": backend, "n": n, "max_abs_err": err, "ms": ms,
                   "torch_lerp_ms": max(ref_ms - copy_ms, 1e-6), "GBps": gbs,
                   "fraction_of_peak_4800": gbs / PEAK_HBM_GBS,
                   "fraction_of_copy_4300": gbs / MEASURED_COPY_GBS, "bytes": nbytes}
            fig["compiled"] = _triton_stats(ema=True)
            return fig, [] if fig["compiled"] else ["registers/spills"]
        return run

    rec.case("ema-fp32", ema_case(False))
    rec.case("ema-fp32-bf16copy", ema_case(True))

    from ibot_fast.kernels import soft_ce, soft_ce_linear
    K, D = (64, 16) if ctx.dry_run else (8192, 256)
    shapes = DRY_KERNEL_SHAPES if ctx.dry_run else KERNEL_SHAPES
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def pairs(M, T, P):
        partner = torch.randint(0, T, (M, P), device=dev, generator=gen)
        weight = torch.rand(M, P, device=dev, generator=gen) + 0.1
        center = 0.1 * torch.randn(K, device=dev, generator=gen)
        return partner, weight, center

    def compare(run_fast, run_ref, nbytes, flops):
        loss_f, grads_f = run_fast()
        loss_r, grads_r = run_ref()
        rel = abs(loss_f.item() - loss_r.item()) / max(abs(loss_r.item()), 1e-30)
        grad_err = max((a.float() - b.float()).abs().max().item()
                       for a, b in zip(grads_f, grads_r))
        grad_scale = max(b.float().abs().max().item() for b in grads_r)
        ms, _ = ctx.time_ms(run_fast)
        ref_ms, _ = ctx.time_ms(run_ref)
        fig = {"loss_rel_err": rel, "grad_max_abs_err": grad_err, "grad_max_abs": grad_scale,
               "ms_fwd_bwd": ms, "torch_ms_fwd_bwd": ref_ms, "speedup_vs_torch": ref_ms / ms,
               "min_bytes": nbytes, "GBps_of_min_bytes": nbytes / ms / 1e6,
               "fraction_of_copy_4300": nbytes / ms / 1e6 / MEASURED_COPY_GBS}
        if flops:
            fig.update(flops=flops, TFLOPs=flops / ms / 1e9)
        fig["compiled"] = _triton_stats(ema=False)
        return fig, [] if fig["compiled"] else ["registers/spills"]

    def soft_ce_case(dt, rows):
        def run():
            M, T, P = (shapes[rows][k] for k in "MTP")
            s = (3 * torch.randn(M, K, device=dev, generator=gen)).to(dtypes[dt])
            t = (3 * torch.randn(T, K, device=dev, generator=gen)).to(dtypes[dt])
            partner, weight, center = pairs(M, T, P)

            def call(backend):
                x = s.detach().requires_grad_()
                loss = soft_ce(x, t, partner, weight, center, 0.1, 0.04, backend=backend)
                loss.backward()
                return loss.detach(), [x.grad]
            es = s.element_size()
            return compare(lambda: call(_fast_backend(ctx)), lambda: call("torch"),
                           es * K * (2 * M + T), None)
        return run

    def soft_ce_linear_case(dt, rows):
        def run():
            M, T, P = (shapes[rows][k] for k in "MTP")
            f = torch.nn.functional

            def unit(*shape):
                return f.normalize(torch.randn(*shape, device=dev, generator=gen), dim=-1)
            zs, ws = unit(M, D).to(dtypes[dt]), unit(K, D).to(dtypes[dt])
            zt, wt = unit(T, D).to(dtypes[dt]), unit(K, D).to(dtypes[dt])
            partner, weight, center = pairs(M, T, P)

            def call(backend):
                a, b = zs.detach().requires_grad_(), ws.detach().requires_grad_()
                loss = soft_ce_linear(a, b, zt, wt, partner, weight, center, 0.1, 0.04,
                                      backend=backend)
                loss.backward()
                return loss.detach(), [a.grad, b.grad]
            es = zs.element_size()
            # logits of the student (fwd), the teacher, dZ and dW: 2·K·D each per row
            return compare(lambda: call(_fast_backend(ctx)), lambda: call("torch"),
                           es * D * (2 * M + T + 3 * K), 2 * K * D * (3 * M + T))
        return run

    for dt in ("bf16", "fp32"):
        for rows in ("patch", "cls"):
            rec.case(f"soft_ce-{dt}-{rows}", soft_ce_case(dt, rows))
    for dt in ("bf16", "fp32"):  # fp32 last: its compile is the slowest
        for rows in ("patch", "cls"):
            rec.case(f"soft_ce_linear-{dt}-{rows}", soft_ce_linear_case(dt, rows))


# ----------------------------------------------------------------------------------- step
def _step_argv(case, fast: bool, fused: bool, device: str, out_dir: Path):
    """Trainer flags of a benchmark step; ``--fast_step`` picks the path (an alias of the
    step-path flag in newer trees), so the same command lines work before and after."""
    return ["--arch", case["arch"], "--patch_size", "16", "--global_crops_size", str(case["g"]),
            "--local_crops_size", str(case["l"]), "--local_crops_number", str(case["nl"]),
            "--batch_size_per_gpu", str(case["B"]), "--out_dim", str(case["K"]),
            "--head_hidden_dim", str(case["hidden"]), "--head_bottleneck_dim", str(case["bd"]),
            "--shared_head", "true",
            "--norm_last_layer", "false", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0",
            "0.2", "--precision", "bf16" if device == "cuda" else "fp32", "--device", device,
            "--num_workers", "0", "--data_path", f"synthetic:{case['B']}", "--output_dir",
            str(out_dir), "--epochs", "100", "--warmup_teacher_temp_epochs", "30",
            "--progress", "false", "--fast_step", str(fast).lower(),
            "--fused_head_loss", str(fused).lower(), "--mask_backend", "python"]


def _batch(ctx: Ctx, case, seed=0):
    """Random crops on the device and README-recipe masks (never zeros)."""
    torch = ctx.torch
    from ibot_fast.masking import MaskBatcher, MaskGenerator
    g = torch.Generator().manual_seed(seed)
    B = case["B"]
    images = [torch.randn(B, 3, case["g"], case["g"], generator=g) for _ in range(2)]
    images += [torch.randn(B, 3, case["l"], case["l"], generator=g) for _ in range(case["nl"])]
    h = case["g"] // 16
    masks = MaskBatcher(MaskGenerator([0.0, 0.3], [0.0, 0.2]), "python", seed=seed).generate(
        list(range(B)), 0, h, h, 2)
    return [im.to(ctx.device) for im in images], masks.to(ctx.device)


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _step_variant(ctx: Ctx, case, variant, out: Path):
    """(step function, keepalive) for one variant, built through Trainer + parse_args."""
    from ibot_fast.config import parse_args
    from ibot_fast.train import Trainer
    images, masks = _batch(ctx, case)
    tmp = out / "tmp" / f"{case['arch']}-{variant}"
    it = 50
    fast = variant not in ("reference", "refstyle")
    tr = Trainer(parse_args(_step_argv(case, fast, variant == "fast_fused", ctx.device, tmp)))
    if variant == "refstyle":
        # the reference's computation pattern on the reference path's models (bench_step.py)
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_step import refstyle_parts, reference_style_step
        loss_fn = refstyle_parts(tr)
        return (lambda: reference_style_step(tr, loss_fn, images, masks, 1, it)), tr
    return (lambda: tr.train_step(images, masks, 1, it)["loss"]), tr


def _run_steps(rec: Recorder, ctx: Ctx, case_name, case, variants, out: Path):
    torch = ctx.torch
    useful = {}  # the default step's FLOPs: the work the loss needs (MFU of every variant)

    for variant in variants:
        def run():
            step, keep = _step_variant(ctx, case, variant, out)
            step()  # first step: compiles, allocator
            flops = _count_flops(step)
            if variant == "fast":
                useful["flops"] = flops
            if ctx.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms, times = ctx.time_ms(step)
            fig = {"arch": case["arch"], "batch": case["B"],
                   "crops": f"2x{case['g']}+{case['nl']}x{case['l']}", "K": case["K"],
                   "precision": "bf16" if ctx.cuda else "fp32", "ms": ms,
                   "ms_all": [round(t, 3) for t in times], "img_s": case["B"] / ms * 1e3,
                   "step_gflop_counted": flops / 1e9, "achieved_TFLOPs": flops / ms / 1e9}
            unmeasured = []
            if ctx.cuda:
                fig["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                fig["mfu_counted"] = flops / ms / 1e9 / PEAK_BF16_TFLOPS
                if "flops" in useful:
                    fig["mfu_useful"] = useful["flops"] / ms / 1e9 / PEAK_BF16_TFLOPS
                else:
                    unmeasured.append("mfu_useful")
            else:
                unmeasured += ["peak_mem_GiB", "mfu_counted", "mfu_useful"]
            del keep, step
            return fig, unmeasured

        rec.case(f"{case_name}-{variant}", run)
        import gc
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def stage_step(rec: Recorder, ctx: Ctx, out: Path):
    case = DRY_STEP_CASE if ctx.dry_run else STEP_CASES["vit_small"]
    _run_steps(rec, ctx, "vit_small", case, STEP_VARIANTS, out)


def stage_vit_base(rec: Recorder, ctx: Ctx, out: Path):
    case = DRY_STEP_CASE if ctx.dry_run else STEP_CASES["vit_base"]
    _run_steps(rec, ctx, "vit_base", case, ("fast", "reference"), out)


# ---------------------------------------------------------------------- pytest and mask ext
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_capped(cmd, cap_s: float, **kw):
    """Run ``cmd`` for at most ``cap_s`` seconds; returns its exit code, or None when it was
    stopped (its whole process group: compile workers go with it)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True, **kw)
    try:
        return proc.wait(timeout=max(cap_s, 0.1))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return None


def _pytest_cmd(out: Path, name: str, targets, extra=()):
    cmd = [sys.executable, "-m", "pytest", *targets, "-m", "gpu", "-q", "-rs",
           "-p", "no:cacheprovider", "--junitxml", str(out / f"{name}.xml"), *extra]
    try:
        import pytest_timeout  # noqa: F401 -- one hanging test must not eat the stage
        cmd += ["--timeout", "120"]
    except ImportError:
        pass
    return cmd


def _junit_figures(path: Path):
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    fig = {k: sum(int(s.get(k, 0)) for s in suites)
           for k in ("tests", "failures", "errors", "skipped")}
    fig["passed"] = fig["tests"] - fig["failures"] - fig["errors"] - fig["skipped"]
    bad = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    fig["not_passed"] = bad[:50]
    return fig


def _run_pytest(rec: Recorder, case, cmd, out: Path, log_name: str, cap_s: float, dry: bool):
    if dry:
        return rec.emit(case, "planned", command=" ".join(cmd), reason="dry run")
    t0 = time.perf_counter()
    with open(out / f"{log_name}.log", "w") as log:
        rc = run_capped(cmd, cap_s, stdout=log, stderr=subprocess.STDOUT)
    xml = out / f"{log_name}.xml"
    fig = _junit_figures(xml) if xml.exists() else {}
    status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    return rec.emit(case, status, fig, [] if fig else ["junit"],
                    wall_s=time.perf_counter() - t0, exit_code=rc, command=" ".join(cmd),
                    log=f"{log_name}.log")


BUILD_CMD = [sys.executable, "setup.py", "build_ext", "--inplace"]


def start_ext_build(out: Path):
    """The CUDA mask extension, built in place in the background while the stages run."""
    log = open(out / "mask-ext-build.log", "w")
    env = _env()
    env["IBOT_FAST_REQUIRE_EXT"] = "1"
    return subprocess.Popen(BUILD_CMD, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stage_mask_ext(rec: Recorder, out: Path, build, cap_s: float, dry: bool):
    deadline = time.monotonic() + cap_s
    if dry or build is None:
        rec.emit("build", "planned", command=" ".join(BUILD_CMD), reason="dry run")
    else:
        t0 = time.perf_counter()
        try:
            rc = build.wait(timeout=max(deadline - time.monotonic() - 20, 1))
        except subprocess.TimeoutExpired:
            _stop(build)
            rc = None
        tail = (out / "mask-ext-build.log").read_text(errors="replace")[-1500:]
        status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
        rec.emit("build", status, {"exit_code": rc}, wall_s=time.perf_counter() - t0,
                 log="mask-ext-build.log", log_tail=tail)
        if rc != 0:
            return rec.emit("pytest-mask-ext", "skipped", reason="the extension did not build")
    cmd = _pytest_cmd(out, "mask-ext-tests", ["tests/test_mask_ext.py"])
    _run_pytest(rec, "pytest-mask-ext", cmd, out, "mask-ext-tests",
                deadline - time.monotonic(), dry)


# ------------------------------------------------------------------------------- driver
def run_child_stage(stage: str, out: Path, dry_run: bool, reps: int, warmup: int):
    rec = Recorder(out, stage, dry_run)
    ctx = Ctx(dry_run, reps, warmup)
    if stage == "kernels":
        stage_kernels(rec, ctx)
    elif stage == "step":
        stage_step(rec, ctx, out)
    elif stage == "vit_base":
        stage_vit_base(rec, ctx, out)
    else:
        raise SystemExit(f"run_gpu.py: {stage} is not a child stage")


def _lines(out: Path) -> list:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    recs = []
    for ln in path.read_text().splitlines():
        try:
            recs.append(json.loads(ln))
        except ValueError:
            pass
    return recs


def run_plan(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    caps = dict(kv.split("=") for kv in args.cap)
    stages = [s for s in PLAN if not args.only or s[0] in args.only]
    dry = args.dry_run
    isolate = args.isolate if args.isolate is not None else not dry
    build = None
    if any(s[0] == "mask_ext" for s in stages) and not dry:
        build = start_ext_build(out)
    for name, est_s, child in stages:
        left = deadline - time.monotonic()
        cap = min(float(caps.get(name, 1.5 * est_s)), left)
        rec = Recorder(out, name, dry)
        if left < 3:
            for case in STAGE_CASES[name]:
                rec.emit(case, "skipped", reason="no time left in the budget")
            continue
        print(f"run_gpu: === {name} (estimate {est_s} s, cap {cap:.0f} s) ===", flush=True)
        if name == "env":
            stage_env(rec, Ctx(dry, args.reps, args.warmup))
        elif name == "tests":
            cmd = _pytest_cmd(out, "gpu-tests", ["tests"],
                              ["--ignore", "tests/test_mask_ext.py"])
            _run_pytest(rec, "pytest-gpu", cmd, out, "gpu-tests", cap, dry)
        elif name == "mask_ext":
            stage_mask_ext(rec, out, build, cap, dry)
        elif child and isolate:
            before = len(_lines(out))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
                   "--out", str(out), "--reps", str(args.reps), "--warmup", str(args.warmup)]
            if dry:
                cmd.append("--dry-run")
            rc = run_capped(cmd, cap)
            why = (f"the stage ran past its cap of {cap:.1f} s and was stopped" if rc is None
                   else f"the stage's process exited with code {rc}")
            done = {r["case"] for r in _lines(out)[before:] if r.get("stage") == name}
            for case in STAGE_CASES[name]:
                if case not in done:
                    rec.emit(case, "timeout", reason=why)
        else:
            run_child_stage(name, out, dry, args.reps, args.warmup)
    if build is not None and build.poll() is None:
        _stop(build)
    print(f"run_gpu: done in {time.monotonic() - t_start:.0f} s; results in "
          f"{out / 'results.jsonl'}", flush=True)
    return 0


def plan_json() -> dict:
    return {"budget_s": BUDGET_S, "stages": [
        {"stage": n, "estimated_s": e, "child_process": c, "cases": STAGE_CASES[n]}
        for n, e, c in PLAN], "estimated_total_s": sum(e for _, e, _ in PLAN)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run the plan on the CPU with tiny shapes (pytest and the extension "
                        "build are only planned)")
    p.add_argument("--plan", action="store_true", help="print the stage plan as JSON and exit")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / ".gpu_out"),
                   help="results folder (default: $OUT, else .gpu_out)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="seconds for the whole plan; each stage is capped by what is left")
    p.add_argument("--only", nargs="*", default=[], choices=[n for n, _, _ in PLAN],
                   help="run only these stages")
    p.add_argument("--cap", nargs="*", default=[], metavar="STAGE=S",
                   help="cap a stage at S seconds (default 1.5x its estimate)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (10; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (2; dry run 1)")
    p.add_argument("--isolate", type=lambda v: v.lower() == "true", default=None,
                   help="run the torch stages in child processes (default: true, dry run false)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plan:
        print(json.dumps(plan_json(), indent=1))
        return 0
    args.reps = args.reps or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 2)
    if args.child:
        run_child_stage(args.child, Path(args.out), args.dry_run, args.reps, args.warmup)
        return 0
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
