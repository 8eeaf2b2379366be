"""ibot_fast/ema.py and kernels/ema_triton.py: the flat EMA against the reference's
per-parameter EMA, and the Triton kernel against ``torch.lerp_``.

The Triton kernel runs on CUDA (tests marked ``gpu``: CUDA models and buffers) and, on a CPU
machine, under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py when there is
no GPU; those tests skip on a CUDA host, where the ``gpu`` ones run instead)."""
from __future__ import annotations

import os

import pytest
import torch

from ibot_fast.ema import EMATeacherUpdate, FlatEMA
from ibot_fast.models import build_ibot_models

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="the Triton interpreter runs on CPU hosts (TRITON_INTERPRET=1); "
                            "on a CUDA host the gpu-marked twin runs")


def _pair(shared_head, device="cpu"):
    torch.manual_seed(0)
    s, t = build_ibot_models("vit_nano", 8, img_size=16, out_dim=8, patch_out_dim=8,
                             shared_head=shared_head, head_hidden_dim=8, head_bottleneck_dim=4)
    s, t = s.to(device), t.to(device)
    with torch.no_grad():  # a student that differs from the teacher
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    return s, t


def _check_flat_ema(shared_head, backend, device="cpu", bf16_copy=False):
    s1, t1 = _pair(shared_head, device)
    s2, t2 = _pair(shared_head, device)
    ref = EMATeacherUpdate(s1, t1)
    flat = FlatEMA(s2, t2, backend=backend, bf16_copy=bf16_copy)
    assert flat.backend == backend
    # parameters now live in the flat buffers (same Parameter objects, values kept)
    for (n, p), (_, q) in zip(s1.named_parameters(), s2.named_parameters()):
        assert torch.equal(p, q), n
    lo = flat.teacher_flat.data_ptr()
    hi = lo + flat.teacher_flat.numel() * flat.teacher_flat.element_size()
    assert all(lo <= p.data_ptr() < hi for p in flat.teacher_params)
    for m in (0.996, 0.3):  # both lerp formulas (weight below / above 1/2)
        ref(m)
        flat(m)
        for (n, p), (_, q) in zip(t1.named_parameters(), t2.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
        if bf16_copy:
            assert torch.equal(flat.teacher_bf16_flat, flat.teacher_flat.to(torch.bfloat16))


@pytest.mark.parametrize("shared_head", [True, False])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_flat_ema_equals_reference_ema(shared_head, backend):
    _check_flat_ema(shared_head, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("bf16_copy", [False, True])
@pytest.mark.parametrize("shared_head", [True, False])
def test_flat_ema_triton_equals_reference_ema_gpu(shared_head, bf16_copy):
    """The Triton flat EMA on CUDA models (and its bf16 teacher copy) against the
    per-parameter reference EMA on the same device."""
    _check_flat_ema(shared_head, "triton", device="cuda", bf16_copy=bf16_copy)


def _check_kernel(device, n, dtype, momentum, bf16, block=None):
    from ibot_fast.kernels.ema_triton import ema_flat_
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, generator=g, dtype=dtype).to(device)
    s = torch.randn(n, generator=g, dtype=dtype).to(device)
    want = t.clone().lerp_(s, 1 - momentum)
    t16 = torch.zeros(n, dtype=torch.bfloat16, device=device) if bf16 else None
    ema_flat_(t, s, momentum, t16, **({} if block is None else {"block": block}))
    # lerp_ may use an FMA where the kernel rounds twice: one ulp of slack
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(t, want, rtol=2 * eps, atol=2 * eps)
    if bf16:
        assert torch.equal(t16, t.to(torch.bfloat16))


KERNEL_CASES = pytest.mark.parametrize("dtype, momentum, bf16", [
    (dtype, momentum, bf16) for bf16 in (False, True) for momentum in (0.996, 0.25)
    for dtype in (torch.float32, torch.float64)])


@needs_interpreter
@KERNEL_CASES
def test_ema_triton_kernel_equals_lerp(dtype, momentum, bf16):
    """The kernel against torch.lerp_ (n not a multiple of the block; both lerp branches)."""
    _check_kernel("cpu", 3 * 1024 + 17, dtype, momentum, bf16, block=1024)


@pytest.mark.gpu
@KERNEL_CASES
def test_ema_triton_kernel_equals_lerp_gpu(dtype, momentum, bf16):
    """On CUDA at the ViT-S teacher's size (~22 M parameters, not a multiple of the block),
    with the wrapper's default block."""
    _check_kernel("cuda", 22_000_017, dtype, momentum, bf16)
