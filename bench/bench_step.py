"""Benchmark: one training step -- the fast step vs a reference-style step, side by side.

    python -m pytest bench/bench_step.py --benchmark-only -q            # CPU groups
    python -m pytest bench/bench_step.py --benchmark-only -q -m gpu     # GPU groups (CUDA)

Variants (names as in ibot_fast/fast_step.py and tests/test_fast_step.py):

* ``refstyle`` -- :func:`reference_style_step`, written here to reproduce the reference's
  computation pattern: teacher, student globals and
  student locals as three separate passes, explicit softmax attention (``math``), the head on
  every token (local patch logits thrown away), the dense fp32 loss (``IBOTLossReference``),
  ``loss.item()`` for the finiteness check, per-parameter clipping with one ``.item()`` per
  tensor, for-loop AdamW, a Python-loop EMA with three kernels per tensor.
* ``reference`` -- the real reference: ``ibot_fast.reference_repo.ReferenceTrainStep``, the
  networks, loss and loop body of the bytedance/ibot checkout in ``IBOT_REFERENCE_REPO`` (its
  own ViT, iBOTHead, iBOTLoss, clipping, EMA; skipped when the variable is unset). Its random
  initial weights differ from the others' (same shapes, same work).
* ``reference_path`` -- ``Trainer.train_step`` with ``--step reference`` (our exact twin of the
  reference's computation order, the ground truth of the tests).
* ``fast`` -- ``Trainer.train_step`` with the default ``--step fast`` (selected-token head, teacher
  centre by linearity, packed crops, SDPA, fused loss, fused AdamW, flat EMA).
* ``fast_fused`` -- ``fast`` with ``--fused_head_loss true`` (the patch head's K2-way layer
  inside the loss, ``soft_ce_linear``: no ``[M, K2]`` logits).
* ``fast_compile`` / ``fast_compile_step`` -- ``fast`` with ``--compile blocks`` / ``--compile
  step`` (only with ``IBOT_BENCH_COMPILE=1``: minutes of inductor compilation each).

The one-call GPU measurement with results written case by case is ``bench/gpu/run_gpu.py``;
this file is the pytest-benchmark view (its JSON is written when the session ends).

Inputs are synthetic and already on the device (random crops; README-recipe masks from the
batch API), so the model alone is measured. Each benchmark reports in ``extra_info``: img/s,
the FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, forward
and backward), achieved TFLOP/s, and on CUDA the peak memory and MFU against the GPU's dense
bf16 peak (``IBOT_PEAK_TFLOPS`` overrides). MFU counts the *fast* step's FLOPs for both
variants: the work the loss needs, so the reference-style step's wasted head work does not
count as utilisation.

``test_step_cpu_swin_recipe``: the same three variants (reference, reference_path, fast) for
swin_tiny at the README Swin-T/14 recipe's crops (patch 4, window 14, 2 x 224 + 10 x 96, K = 8192
shared head, fp32, batch 2); the fast step runs Swin's crops per resolution (no packing).

``test_step_cpu_recipe_interleaved``: both recipe shapes (ViT-S and swin_tiny), the real
reference step and the default step alternating round by round, so a machine whose speed drifts
moves both alike; the ratio (``fast_vs_reference`` in ``extra_info``) is the figure to quote.

``test_selected_head_flops`` counts the head's FLOPs alone (student and teacher, forward and
backward where the step runs them) on all tokens vs on the selected rows, against the analytic
count of rows.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import pytest
import torch

from ibot_fast.config import parse_args
from ibot_fast.loss import IBOTLossReference
from ibot_fast.masking import MaskBatcher, MaskGenerator
from ibot_fast.optim import get_params_groups
from ibot_fast.train import Trainer

# CPU: tiny/small ViT/16 on small images (96-px globals, 48-px locals: 6x6 / 3x3 patches),
# 2 + 4 crops, batch 8, the recipe's 8192-way shared head, fp32.
CPU_CASES = {
    "vit_tiny": dict(arch="vit_tiny", g=96, l=48, nl=4, B=8),
    "vit_small": dict(arch="vit_small", g=96, l=48, nl=4, B=8),
}
# GPU: the iBOT recipe (2 x 224 + 10 x 96, K = 8192, bf16), batch per GPU.
GPU_CASES = {
    "vit_small": dict(arch="vit_small", g=224, l=96, nl=10, B=128),
    "vit_base": dict(arch="vit_base", g=224, l=96, nl=10, B=64),
}
COMPILE_VARIANTS = ["fast_compile", "fast_compile_step"] if os.environ.get("IBOT_BENCH_COMPILE") \
    else []  # minutes of inductor compilation each: opt-in
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def _argv(case, fast: bool, precision: str, device: str, compile_=False, fused: bool = False):
    swin = ["--window_size", str(case["window"])] if "window" in case else []
    return swin + [
            "--arch", case["arch"], "--patch_size", str(case.get("patch", 16)),
            "--global_crops_size", str(case["g"]),
            "--local_crops_size", str(case["l"]), "--local_crops_number", str(case["nl"]),
            "--batch_size_per_gpu", str(case["B"]), "--out_dim", "8192", "--shared_head", "true",
            "--norm_last_layer", "false", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0",
            "0.2", "--precision", precision, "--device", device, "--num_workers", "0",
            # --threads auto: with no loader worker every usable core computes, as many threads
            # as bench_threads() gives the reference variants
            "--data_path", f"synthetic:{case['B']}", "--output_dir",
            os.path.join(tempfile.gettempdir(), "ibot_bench_step"),
            "--epochs", "100", "--warmup_teacher_temp_epochs", "30", "--progress", "false",
            "--step", "fast" if fast else "reference", "--compile", str(compile_).lower(),
            "--fused_head_loss", str(fused).lower(), "--mask_backend", "python"]


def make_batch(case, device, dtype, seed=0):
    """Synthetic crops on the device + a README-recipe MaskBatch (fixed across rounds)."""
    g = torch.Generator().manual_seed(seed)
    B = case["B"]
    images = [torch.randn(B, 3, case["g"], case["g"], generator=g) for _ in range(2)]
    images += [torch.randn(B, 3, case["l"], case["l"], generator=g) for _ in range(case["nl"])]
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    h = case["g"] // case.get("mask_cell", 16)  # the mask grid (Swin: 32-px cells)
    masks = MaskBatcher(gen, "python", seed=seed).generate(list(range(B)), 0, h, h, 2)
    return [im.to(device, dtype) for im in images], masks.to(device)


# ---------------------------------------------------------------- the reference-style step
def _unwrap(m):
    return m.module if hasattr(m, "module") else m


def reference_style_step(tr: Trainer, loss_fn, images, masks, epoch: int, it: int):
    """One step in the reference's computation pattern, on a Trainer's models."""
    args, ng = tr.args, tr.args.global_crops_number
    student, teacher = tr.student_without_ddp, tr.teacher
    for g in tr.optimizer.param_groups:
        g["lr"] = float(tr.lr_schedule[it])
    tr.optimizer.param_groups[0]["weight_decay"] = float(tr.wd_schedule[it])
    with tr.autocast():
        teacher_output = teacher(images[:ng])
        student_output = student(images[:ng], mask=list(masks)[:ng])
        student_local_cls = student(images[ng:])[0]
        terms = loss_fn(student_output, teacher_output, student_local_cls, list(masks), epoch)
    loss = terms["loss"]
    if not torch.isfinite(loss).item():  # the reference's per-step loss.item() check
        raise RuntimeError("non-finite loss")
    tr.optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():  # utils.clip_gradients: one host sync per tensor
        if p.grad is not None:
            coef = args.clip_grad / (p.grad.norm(2).item() + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    if epoch < args.freeze_last_layer:
        for n, p in student.named_parameters():
            if "last_layer" in n:
                p.grad = None
    tr.optimizer.step()
    m = float(tr.momentum_schedule[it])
    with torch.no_grad():  # Python-loop EMA, three kernels per tensor
        s_params = dict(student.named_parameters())
        for n, pt in teacher.named_parameters():
            if n in s_params:
                pt.data.mul_(m).add_((1 - m) * s_params[n].detach().data)
    return loss.detach()


def build_reference(case, precision, device):
    """The real reference's step (IBOT_REFERENCE_REPO); skips the benchmark without it."""
    repo = os.environ.get("IBOT_REFERENCE_REPO")
    if not repo:
        pytest.skip("set IBOT_REFERENCE_REPO to a bytedance/ibot checkout")
    from ibot_fast.reference_repo import ReferenceTrainStep, load_reference

    torch.manual_seed(0)
    # synthetic:B with batch B: one iteration per epoch, as the Trainer of the other variants
    return ReferenceTrainStep(load_reference(repo), parse_args(_argv(case, False, precision,
                                                                     device)),
                              iters_per_epoch=1, device=device)


def build_refstyle(case, precision, device):
    tr = Trainer(parse_args(_argv(case, False, precision, device)))
    return tr, refstyle_parts(tr)


def refstyle_parts(tr: Trainer):
    """Turn a reference-path Trainer into the reference-style step's parts (explicit softmax
    attention, for-loop AdamW) and return its dense reference loss."""
    for m in (tr.student_without_ddp, tr.teacher):
        m.backbone.set_attn_backend("math")
    tr.optimizer = torch.optim.AdamW(get_params_groups(tr.student_without_ddp), foreach=False)
    a = tr.args
    loss_fn = IBOTLossReference(a.out_dim, a.patch_out_dim, 2, a.local_crops_number,
                                a.warmup_teacher_temp, a.teacher_temp,
                                a.warmup_teacher_patch_temp, a.teacher_patch_temp,
                                a.warmup_teacher_temp_epochs, a.epochs).to(tr.device)
    return loss_fn


# ------------------------------------------------------------------------------- helpers
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _peak_tflops(device):
    if os.environ.get("IBOT_PEAK_TFLOPS"):
        return float(os.environ["IBOT_PEAK_TFLOPS"])
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_threads() -> int:
    """Intra-op threads of every variant: the cores this process may use, at most 2 (run under
    ``taskset -c 0`` for a one-core comparison while the other core is busy)."""
    return min(2, len(os.sched_getaffinity(0)))


def _step_fn(variant, case, precision, device, images, masks, it=50):
    """(trainer, one-step callable) of a variant on a fixed batch."""
    if variant == "refstyle":
        tr, loss_fn = build_refstyle(case, precision, device)
        step = lambda: reference_style_step(tr, loss_fn, images, masks, 1, it)  # noqa: E731
    elif variant == "reference":
        tr = build_reference(case, precision, device)
        step = lambda: tr(images, list(masks), 1, it)["loss"]  # noqa: E731
    elif variant == "reference_path":  # our --step reference (the exact twin of the default)
        tr = Trainer(parse_args(_argv(case, False, precision, device)))
        step = lambda: tr.train_step(images, masks, 1, it)["loss"]  # noqa: E731
    else:
        compile_ = {"fast_compile": "blocks", "fast_compile_step": "step"}.get(variant, False)
        tr = Trainer(parse_args(_argv(case, True, precision, device, compile_=compile_,
                                      fused=variant == "fast_fused")))
        step = lambda: tr.train_step(images, masks, 1, it)["loss"]  # noqa: E731
    return tr, step


def _run_case(benchmark, variant, case, precision, device, rounds, it=50):
    images, masks = make_batch(case, device, torch.float32)
    tr, step = _step_fn(variant, case, precision, device, images, masks, it)
    step()  # warm-up (compiles, allocator)
    # the fast step's FLOPs: the work the loss needs (MFU numerator for both variants)
    fast_flops = None
    if variant not in ("refstyle", "reference", "reference_path"):
        fast_flops = count_flops(step)
    flops = fast_flops if fast_flops is not None else count_flops(step)
    _sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        step()
        _sync(device)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing timed
        return tr, {"step_gflop": flops / 1e9}
    sec = benchmark.stats.stats.median
    n_img = case["B"]
    info = {"img_s": n_img / sec, "step_gflop": flops / 1e9,
            "achieved_tflops": flops / sec / 1e12, "batch": n_img, "case": case,
            "precision": precision}
    if torch.device(device).type == "cuda":
        info["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info.update(info)
    return tr, info


# ------------------------------------------------------------------------------ CPU groups
@pytest.mark.parametrize("case_name", list(CPU_CASES))
@pytest.mark.parametrize("variant", ["refstyle", "reference", "fast", "fast_fused"]
                         + COMPILE_VARIANTS)
def test_step_cpu(benchmark, case_name, variant):
    torch.set_num_threads(bench_threads())
    benchmark.group = f"step cpu {case_name} 2x96+4x48 B=8 fp32"
    _run_case(benchmark, variant, CPU_CASES[case_name], "fp32", "cpu",
              rounds=int(os.environ.get("IBOT_BENCH_ROUNDS", 5)))


# The iBOT recipe's crops on the CPU (ViT-S/16, 2 x 224 + 10 x 96, K = 8192 shared head, fp32,
# batch 4): the default step (``fast``) against the real reference step and our reference path.
RECIPE_CPU_CASE = dict(arch="vit_small", g=224, l=96, nl=10, B=4)


@pytest.mark.parametrize("variant", ["reference", "reference_path", "fast"])
def test_step_cpu_recipe(benchmark, variant):
    torch.set_num_threads(bench_threads())
    benchmark.group = "step cpu vit_small/16 recipe 2x224+10x96 B=4 fp32"
    _run_case(benchmark, variant, RECIPE_CPU_CASE, "fp32", "cpu",
              rounds=int(os.environ.get("IBOT_BENCH_ROUNDS", 5)))


# The README Swin-T/14 recipe's crops on the CPU (swin_tiny, patch 4, window 14, 2 x 224 +
# 10 x 96, K = 8192 shared head, fp32, batch 2): default step vs the real reference step and
# our reference path.
SWIN_RECIPE_CPU_CASE = dict(arch="swin_tiny", g=224, l=96, nl=10, B=2, patch=4, window=14,
                            mask_cell=32)


@pytest.mark.parametrize("variant", ["reference", "reference_path", "fast"])
def test_step_cpu_swin_recipe(benchmark, variant):
    torch.set_num_threads(bench_threads())
    benchmark.group = "step cpu swin_tiny/4 window 14 recipe 2x224+10x96 B=2 fp32"
    _run_case(benchmark, variant, SWIN_RECIPE_CPU_CASE, "fp32", "cpu",
              rounds=int(os.environ.get("IBOT_BENCH_ROUNDS", 5)))


# Both recipe shapes again, the real reference and the default step *alternating* round by
# round in one test: a machine whose speed drifts over minutes (the 2-core CI-class machine's
# reference time moved from 4.8 s to 5.6 s between two runs) moves both medians alike, so the
# ratio is the figure to quote.
INTERLEAVED_CASES = {"vit_small": RECIPE_CPU_CASE, "swin_tiny": SWIN_RECIPE_CPU_CASE}


@pytest.mark.parametrize("case_name", list(INTERLEAVED_CASES))
def test_step_cpu_recipe_interleaved(benchmark, case_name):
    """One benchmark round = one reference step then one default step; extra_info holds each
    variant's median over the rounds and their ratio (default / reference)."""
    torch.set_num_threads(bench_threads())
    case = INTERLEAVED_CASES[case_name]
    benchmark.group = f"step cpu {case_name} recipe, reference and default alternating"
    images, masks = make_batch(case, "cpu", torch.float32)
    steps = {v: _step_fn(v, case, "fp32", "cpu", images, masks)[1]
             for v in ("reference", "fast")}
    for step in steps.values():
        step()  # warm-up
    times = {v: [] for v in steps}

    def pair():
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=int(os.environ.get("IBOT_BENCH_ROUNDS", 5)),
                       warmup_rounds=0, iterations=1)
    med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    benchmark.extra_info.update({f"{v}_median_s": m for v, m in med.items()})
    benchmark.extra_info.update({f"{v}_all_s": t for v, t in times.items()})
    benchmark.extra_info["fast_vs_reference"] = med["fast"] / med["reference"]


# ------------------------------------------------------------------------------ GPU groups
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_name", list(GPU_CASES))
@pytest.mark.parametrize("variant", ["refstyle", "reference", "fast", "fast_fused"]
                         + COMPILE_VARIANTS)
def test_step_gpu(benchmark, case_name, variant):
    case = GPU_CASES[case_name]
    benchmark.group = f"step gpu {case_name}/16 2x224+10x96 B={case['B']} bf16"
    # refstyle in fp16 + GradScaler would be the reference's exact setting; bf16 for both here
    # so the comparison is the computation pattern, not the number format
    tr, info = _run_case(benchmark, variant, case, "bf16", "cuda", rounds=20)
    peak = _peak_tflops("cuda")
    if peak and variant not in ("refstyle", "reference"):
        benchmark.extra_info["mfu"] = info["achieved_tflops"] / peak


# ---------------------------------------------------------------- the selected-token head
def head_rows(case, M: int, N: int, n: int):
    """Rows through the head MLP / the K-way layer: reference (all tokens) vs selected."""
    B, nl = case["B"], case["nl"]
    ref_student = 2 * B * (1 + N) + nl * B * (1 + n)
    ref_teacher = 2 * B * (1 + N)
    sel_student = 2 * B + nl * B + M
    return {"ref": (ref_student, ref_teacher, ref_teacher),
            # teacher: MLP on every token (for the centre's mean), K-way on [CLS] + M + 1 mean
            "selected": (sel_student, ref_teacher, 2 * B + M + 1)}


def test_selected_head_flops(benchmark):
    """FLOPs of the head alone (student fwd+bwd, teacher fwd), all tokens vs selected rows:
    counted by FlopCounterMode and predicted from the row counts."""
    case = CPU_CASES["vit_tiny"]
    torch.manual_seed(0)
    images, masks = make_batch(case, "cpu", torch.float32)
    tr = Trainer(parse_args(_argv(case, True, "fp32", "cpu")))
    head = tr.student_without_ddp.head
    t_head = tr.teacher.head
    D = tr.student_without_ddp.backbone.embed_dim
    N, n = (case["g"] // 16) ** 2, (case["l"] // 16) ** 2
    M = masks.idx_M.numel()
    rows = head_rows(case, M, N, n)
    B, nl = case["B"], case["nl"]
    # the backbone's tokens need gradients in a real step: every student linear runs 3x
    xg = torch.randn(2 * B, 1 + N, D, requires_grad=True)
    xl = torch.randn(nl * B, 1 + n, D, requires_grad=True)

    def ref_head():
        out = head(xg)
        loc = head(xl)
        with torch.no_grad():
            t_head(xg.detach())
        (out[0].sum() + out[1].sum() + loc[0].sum() + loc[1].sum()).backward()

    def sel_head():
        sel = torch.cat([xg[:, 0], xl[:, 0], xg[:, 1:].reshape(-1, D)[masks.idx_M]])
        z = head.bottleneck(sel)
        head.last_layer(z).sum().backward()
        with torch.no_grad():
            zt = t_head.bottleneck(xg.detach())
            t_head.last_layer(zt[:, 0])
            t_head.last_layer2(zt[:, 1:].reshape(-1, zt.shape[-1])[masks.idx_M])
            t_head.last_layer2(zt[:, 1:].reshape(-1, zt.shape[-1]).mean(0, keepdim=True))

    f_ref, f_sel = count_flops(ref_head), count_flops(sel_head)
    hid, bd, K = 2048, 256, 8192
    mlp = 2 * (D * hid + hid * hid + hid * bd)
    last = 2 * bd * K

    def predicted(r):
        s, t_mlp, t_last = r
        return 3 * s * (mlp + last) + t_mlp * mlp + t_last * last

    benchmark.group = "selected-token head FLOPs (vit_tiny case)"
    benchmark.pedantic(sel_head, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update({
        "counted_gflop_all_tokens": f_ref / 1e9, "counted_gflop_selected": f_sel / 1e9,
        "predicted_gflop_all_tokens": predicted(rows["ref"]) / 1e9,
        "predicted_gflop_selected": predicted(rows["selected"]) / 1e9,
        "saving_counted": 1 - f_sel / f_ref, "rows": rows, "M_padded": M,
        "M_masked": int(masks.n_valid)})
    # the weight-norm of the last layer adds a few K x bd ops per call; rows dominate
    assert abs(f_ref / predicted(rows["ref"]) - 1) < 0.02
    assert abs(f_sel / predicted(rows["selected"]) - 1) < 0.02


if __name__ == "__main__":  # quick manual run: python bench/bench_step.py
    for name, case in CPU_CASES.items():
        images, masks = make_batch(case, "cpu", torch.float32)
        tr, loss_fn = build_refstyle(case, "fp32", "cpu")
        fast = Trainer(parse_args(_argv(case, True, "fp32", "cpu")))
        for label, fn in (("refstyle", lambda: reference_style_step(tr, loss_fn, images, masks,
                                                                      1, 50)),
                          ("fast", lambda: fast.train_step(images, masks, 1, 50))):
            fn()
            t = time.perf_counter()
            for _ in range(3):
                fn()
            print(json.dumps({"case": name, "variant": label,
                              "s_per_step": (time.perf_counter() - t) / 3}))
