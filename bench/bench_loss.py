"""Benchmark: the iBOT loss, forward + backward -- eager reference vs the fused op.

    python -m pytest bench/bench_loss.py --benchmark-only -q            # CPU groups
    python -m pytest bench/bench_loss.py --benchmark-only -q -m gpu     # GPU groups (CUDA)

Variants (one name each, the same in tests/test_loss_ibot.py):
* ``eager``   -- ``IBOTLossReference`` (dense, every patch token; the ground truth);
* ``compile`` -- ``torch.compile`` of the same forward (GPU by default; on the CPU only with
  ``IBOT_BENCH_COMPILE=1``: ~30 s of compilation on 2 cores);
* ``torch``   -- ``IBOTLoss(backend="torch")``, the chunked memory-flat fallback;
* ``triton``  -- ``IBOTLoss(backend="triton")`` (CUDA only);
* ``torch_inplace`` / ``triton_inplace`` -- the same with ``inplace_grad=True`` (dense layout
  only): the patch logits are overwritten by their gradient, no second logits-sized buffer.

Layouts (iBOT ViT-S/16 shapes: 2 global crops x 196 patch tokens, 2 + 10 crops of [CLS],
K = 8192, README masks: half the crops unmasked, the others r ~ U(0.1, 0.5), block-wise):
* ``dense``    -- the drop-in ``forward`` on full [2B, 196, K] patch logits. For *every*
  variant the patch logits are a non-leaf ``clone()`` of a leaf, made before each step (outside
  the timed region and below the memory baseline): the logits pre-exist, as the head's output
  does in training, and the accounting is the same for eager and fused. ``CloneBackward`` passes
  the gradient through unchanged, so it lands in the leaf's ``.grad``: newly allocated by the
  eager and non-inplace variants, the logits' own storage with ``inplace_grad``.
* ``selected`` -- ``forward_selected`` on M gathered masked rows (the fast trainer path); its
  eager comparator is the same maths in plain torch on the gathered rows.

Each benchmark reports in ``extra_info``: the peak *extra* memory of one forward + backward
(bytes above what the inputs occupy: on CUDA ``max_memory_allocated``; on the CPU the RSS
high-water mark (VmHWM) of a fresh process per variant: one warm-up step, its gradients
dropped, ``malloc_trim``, the high-water mark reset through ``/proc/self/clear_refs``, then the
measured step; tracemalloc does not see torch's allocations), the part of it that is the
gradients the step must return (``grad_MB``; ``workspace_MB`` = peak extra - grad), and the
achieved GB/s for the minimum traffic of the layout (logits read once, gradients written once).
``grad_new_MB`` is the part of the gradients that needs new memory (all of them, except the
patch logits' gradient of an ``*_inplace`` variant), and ``workspace_MB`` = peak extra -
grad_new.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from ibot_fast.loss import IBOTLoss, IBOTLossReference, masked_patch_rows
from ibot_fast.masking import MaskGenerator

NG, NL, N, K = 2, 10, 196, 8192
# the CPU criterion (>= 2x time, >= 4x peak memory vs eager) is stated at this batch
CPU_B = int(os.environ.get("IBOT_BENCH_CPU_B", 16))
GPU_B = 64
GPU_SELECTED_M = 7500
EPOCH = 3
LOSS_ARGS = (K, K, NG, NL, 0.04, 0.07, 0.04, 0.07, 30, 100)


# ---- inputs --------------------------------------------------------------------------------
def readme_masks(B: int, seed: int = 0) -> list[torch.Tensor]:
    gen = MaskGenerator.from_preset("vit_small_readme")
    rng = random.Random(seed)
    masks = [torch.from_numpy(
        __import__("numpy").stack([gen(14, 14, rng) for _ in range(B)])) for _ in range(NG)]
    return masks + [torch.zeros(B, 6, 6, dtype=torch.bool)] * NL


def make_inputs(B: int, device: str, dtype: torch.dtype, layout: str = "dense", M=None):
    """Leaves created in place (``empty().normal_()``: no temporaries inflate the baseline)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        x = torch.empty(*shape, device=device, dtype=dtype).normal_(generator=g).mul_(scale)
        return x.requires_grad_(grad)

    x = dict(s_cls=rnd(NG * B, K, grad=True), s_local=rnd(NL * B, K, grad=True),
             t_cls=rnd(NG * B, K, scale=0.3), masks=readme_masks(B))
    if layout == "dense":
        x["s_patch_leaf"] = rnd(NG * B, N, K, grad=True)
        x["t_patch"] = rnd(NG * B, N, K, scale=0.3)
        x["masks"] = [m.to(device) for m in x["masks"]]
        fresh_logits(x)
    else:
        if M is None:  # the masked rows of the README masks
            _, w = masked_patch_rows(x["masks"], NG)
            M = w.numel()
        else:  # a given number of masked rows, all live
            w = torch.full((M,), 1.0 / M)
        x["s_rows"] = rnd(M, K, grad=True)
        x["t_rows"] = rnd(M, K, scale=0.3)
        x["w"] = w.to(device)
        x["t_mean"] = torch.zeros(K, device=device)
    return x


def fresh_logits(x):
    """Dense layout: the patch logits for the next step, a non-leaf (see the module docstring;
    ``inplace_grad`` refuses leaves, and overwrites the tensor, hence one per step)."""
    if "s_patch_leaf" in x:
        x.pop("s_patch", None)  # free the previous step's logits first
        x["s_patch"] = x["s_patch_leaf"].clone()


def eager_selected(loss_fn, x, epoch):
    """The selected-rows maths in plain eager torch (dense over the M gathered rows)."""
    tau, tau2 = loss_fn.temperatures(epoch)
    ng, nc, B = loss_fn.ngcrops, loss_fn.ncrops, x["s_cls"].shape[0] // loss_fn.ngcrops
    s_cls = torch.cat([x["s_cls"], x["s_local"]]).float() / loss_fn.student_temp
    logp = torch.log_softmax(s_cls, -1).view(nc, B, K)
    pt = torch.softmax((x["t_cls"].float() - loss_fn.center) / tau, -1).view(ng, B, K)
    cls = sum(-(pt[q] * logp[v]).sum(-1).mean() for q in range(ng) for v in range(nc) if v != q)
    cls = cls / (ng * nc - ng) * loss_fn.lambda1
    logp2 = torch.log_softmax(x["s_rows"].float() / loss_fn.student_temp, -1)
    pt2 = torch.softmax((x["t_rows"].float() - loss_fn.center2.view(-1)) / tau2, -1)
    patch = (-(pt2 * logp2).sum(-1) * x["w"]).sum() * loss_fn.lambda2
    with torch.no_grad():
        loss_fn.update_center_from_sums(x["t_cls"].float().sum(0), x["t_mean"] * ng * B, ng * B)
    return dict(cls=cls, patch=patch, loss=cls + patch)


def build_step(variant: str, layout: str, x: dict, device: str):
    """A closure running one forward + backward of ``variant`` on ``x``."""
    if variant in ("eager", "compile"):
        loss_fn = IBOTLossReference(*LOSS_ARGS).to(device)
    else:
        loss_fn = IBOTLoss(*LOSS_ARGS, backend=variant.removesuffix("_inplace"),
                           inplace_grad=variant.endswith("_inplace")).to(device)
    if layout == "dense":
        fwd = loss_fn.forward
        if variant == "compile":
            fwd = torch.compile(fwd)

        def step():
            out = fwd((x["s_cls"], x["s_patch"]), (x["t_cls"], x["t_patch"]), x["s_local"],
                      x["masks"], EPOCH)
            out["loss"].backward()
            return out
    else:
        if variant in ("eager", "compile"):
            fwd = (lambda lf, xx, e: eager_selected(lf, xx, e))
            if variant == "compile":
                fwd = torch.compile(fwd)

            def step():
                out = fwd(loss_fn, x, EPOCH)
                out["loss"].backward()
                return out
        else:
            def step():
                out = loss_fn.forward_selected(x["s_cls"], x["t_cls"], x["s_local"], x["s_rows"],
                                               x["t_rows"], x["w"], x["t_mean"], EPOCH)
                out["loss"].backward()
                return out
    return step


def reset_grads(x):
    for v in x.values():
        if torch.is_tensor(v) and v.is_leaf:
            v.grad = None


def new_step_inputs(x):
    reset_grads(x)
    fresh_logits(x)


def min_traffic_bytes(x, layout):
    """Logits read once, student gradients written once (the HBM floor of the step)."""
    def nbytes(t):
        return t.numel() * t.element_size()
    if layout == "dense":
        # every student logit gets a gradient (zeros where unmasked); only masked student rows
        # and every teacher patch row (the centre averages all tokens) must be read
        masked = sum(int(m.sum()) for m in x["masks"][:NG])
        row = K * x["s_patch"].element_size()
        patch = nbytes(x["s_patch"]) + nbytes(x["t_patch"]) + masked * row
    else:
        patch = 2 * nbytes(x["s_rows"]) + nbytes(x["t_rows"])
    cls = 2 * (nbytes(x["s_cls"]) + nbytes(x["s_local"])) + nbytes(x["t_cls"])
    return patch + cls


# ---- peak extra memory ---------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """VmHWM, this process's own RSS high-water mark. Not ``getrusage().ru_maxrss``: after a
    fork + exec that also holds the *parent's* high-water mark (the kernel carries the old
    mm's peak into ``signal->maxrss`` at exec), so under pytest it reports pytest's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_cpu_peak(variant: str, layout: str, B: int) -> dict:
    """Fresh interpreter per variant: RSS high-water mark of one step minus RSS before it."""
    out = subprocess.run([sys.executable, __file__, "--peak", variant, layout, str(B)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_main(variant, layout, B):
    import ctypes
    import gc
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    x = make_inputs(int(B), "cpu", torch.float32, layout)
    step = build_step(variant, layout, x, "cpu")
    step()  # warm-up (compilation for "compile"), then drop its gradients and cached heap
    new_step_inputs(x)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the RSS high-water mark (VmHWM) to the current RSS
    before = _rss_bytes()
    step()
    hwm = _hwm_bytes()
    print(json.dumps(dict(peak_extra_bytes=hwm - before, rss_before=before, hwm_after=hwm)))


def measure_cuda_peak(step, x) -> int:
    new_step_inputs(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---- benchmarks ----------------------------------------------------------------------------
CPU_THREADS = int(os.environ.get("IBOT_BENCH_THREADS", "1"))


def _run(benchmark, variant, layout, device, B, dtype, M=None, rounds=5):
    if device == "cpu":
        # One thread by default: on the shared 2-core CI machines a second OpenMP thread stalls
        # every parallel op for ~24 ms at its barrier whenever the other core is busy, which
        # swamps chunked code with many mid-sized ops. The peak subprocess uses the same count.
        threads = torch.get_num_threads()
        torch.set_num_threads(CPU_THREADS)
        try:
            return _run_impl(benchmark, variant, layout, device, B, dtype, M, rounds)
        finally:
            torch.set_num_threads(threads)
    return _run_impl(benchmark, variant, layout, device, B, dtype, M, rounds)


def _run_impl(benchmark, variant, layout, device, B, dtype, M, rounds):
    x = make_inputs(B, device, dtype, layout, M=M)
    step = build_step(variant, layout, x, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()  # warm-up (compilation, allocator)
    new_step_inputs(x)

    def timed():
        step()
        sync()

    benchmark.pedantic(timed, setup=lambda: new_step_inputs(x), rounds=rounds, iterations=1,
                       warmup_rounds=1)
    mean_s = benchmark.stats.stats.mean
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                dtype=str(dtype).replace("torch.", ""), B=B, K=K,
                masked_rows=sum(int(m.sum()) for m in x["masks"][:NG]) if layout == "dense"
                else x["s_rows"].shape[0])
    traffic = min_traffic_bytes(x, layout)
    info["min_traffic_GB"] = round(traffic / 1e9, 3)
    info["achieved_GBps"] = round(traffic / mean_s / 1e9, 1)
    grads = {k: v.numel() * v.element_size() for k, v in x.items()
             if torch.is_tensor(v) and v.is_leaf and v.requires_grad}
    info["grad_MB"] = round(sum(grads.values()) / 2**20, 1)
    inplace = variant.endswith("_inplace")
    info["grad_new_MB"] = round(sum(b for k, b in grads.items()
                                    if not (inplace and k == "s_patch_leaf")) / 2**20, 1)
    if device == "cuda":
        info["peak_extra_MB"] = round(measure_cuda_peak(step, x) / 2**20, 1)
        info["fraction_of_3TBps_floor"] = round(traffic / mean_s / 3.0e12, 3)
    else:
        peak = measure_cpu_peak(variant, layout, B)
        info["peak_extra_MB"] = round(peak["peak_extra_bytes"] / 2**20, 1)
        info["rss_before_MB"] = round(peak["rss_before"] / 2**20, 1)
        info["threads"] = torch.get_num_threads()
    info["workspace_MB"] = round(info["peak_extra_MB"] - info["grad_new_MB"], 1)


CPU_VARIANTS = ["eager", "torch"] + (["compile"] if os.environ.get("IBOT_BENCH_COMPILE") else [])


@pytest.mark.parametrize("variant", CPU_VARIANTS + ["torch_inplace"])
def test_loss_dense_cpu(benchmark, variant):
    benchmark.group = f"iBOT loss fwd+bwd, dense drop-in, ViT-S/16 B={CPU_B} K={K}, CPU fp32"
    _run(benchmark, variant, "dense", "cpu", CPU_B, torch.float32)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_loss_selected_cpu(benchmark, variant):
    benchmark.group = f"iBOT loss fwd+bwd, selected rows, ViT-S/16 B={CPU_B} K={K}, CPU fp32"
    _run(benchmark, variant, "selected", "cpu", CPU_B, torch.float32)


GPU_VARIANTS = ["eager", "compile", "torch", "triton"]
# bench/ has no conftest: skip here too (tests/conftest.py does it for the test suite)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("variant", GPU_VARIANTS + ["triton_inplace"])
def test_loss_dense_gpu(benchmark, variant, dtype):
    benchmark.group = f"iBOT loss fwd+bwd, dense drop-in, ViT-S/16 B={GPU_B}, {dtype}"
    _run(benchmark, variant, "dense", "cuda", GPU_B, dtype, rounds=20)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_loss_selected_gpu(benchmark, variant, dtype):
    benchmark.group = f"iBOT loss fwd+bwd, selected M={GPU_SELECTED_M}, ViT-S/16 B={GPU_B}, {dtype}"
    _run(benchmark, variant, "selected", "cuda", GPU_B, dtype, M=GPU_SELECTED_M, rounds=20)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak":
        _peak_main(*sys.argv[2:])
    else:
        sys.exit("usage: python bench/bench_loss.py --peak VARIANT LAYOUT B (internal); run "
                 "the benchmarks with pytest")
