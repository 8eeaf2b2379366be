r"""Triton kernel of the flat-buffer EMA teacher update.

The op (the wrapper with the ``lerp_`` fallback is ``ibot_fast.ema.FlatEMA``)::

    w      = 1 - momentum
    t[i]  <- t[i] + w * (s[i] - t[i])        i < n          (torch.lerp_ for w < 0.5)
    t16[i] <- bf16(t[i])                      optional: the teacher's bf16 forward copy

which is ``m·t + (1-m)·s`` of the reference rewritten as torch's ``lerp_`` evaluates it for a
weight below 1/2 (``self + weight·(end - self)``), so the fallback and the kernel round alike
(up to the FMA contraction the GPU compiler may apply). For a weight of 1/2 or more
``lerp_`` uses ``end - (end - self)·(1 - weight)``; the kernel does the same (``HIGH_WEIGHT``),
so the two agree for every momentum.

Memory traffic: read t and s, write t (and t16): 12 B/parameter in fp32 (14 with the bf16
copy), one launch for the whole model instead of three kernels per tensor.

Pointers: ``t_ptr`` (teacher, fp32 or fp64, updated in place), ``s_ptr`` (student, same dtype),
``t16_ptr`` (the bf16 copy viewed as int16, written only when ``WRITE_BF16``), ``w_ptr`` (the weight 1 - momentum, one
element in the buffers' dtype); ``n`` elements, contiguous. Constexprs: ``BLOCK`` (elements per
program), ``WRITE_BF16``, ``HIGH_WEIGHT``. The weight is read from memory, so a new momentum
every step never recompiles and fp64 buffers keep an fp64 weight. Offsets are int64 (a ViT-L teacher with
its head has ~0.3 G parameters; int32 offsets would still fit, but a flat buffer of several
models may not).

Under ``TRITON_INTERPRET=1`` (CPU tests) the interpreter runs the same program with numpy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ema_flat_", "ema_config"]


@triton.jit
def _ema_kernel(t_ptr, s_ptr, t16_ptr, w_ptr, n, BLOCK: tl.constexpr,
                WRITE_BF16: tl.constexpr, HIGH_WEIGHT: tl.constexpr):
    pid = tl.program_id(0)
    weight = tl.load(w_ptr)  # in the buffers' dtype (a Python float would arrive as fp32)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    t = tl.load(t_ptr + offs, mask=live, other=0.0)
    s = tl.load(s_ptr + offs, mask=live, other=0.0)
    if HIGH_WEIGHT:
        out = s - (s - t) * (1.0 - weight)
    else:
        out = t + weight * (s - t)
    tl.store(t_ptr + offs, out, mask=live)
    if WRITE_BF16:
        # fp32 -> bf16 rounded to nearest even by hand: the interpreter's cast truncates, and
        # the bit arithmetic is the same on every back end. t16_ptr is the bf16 buffer viewed
        # as int16; a NaN keeps a quiet-NaN pattern (the bias could carry it into inf).
        x32 = out.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        hi = tl.where(x32 != x32, 0x7FC0, bits >> 16)
        tl.store(t16_ptr + offs, hi.to(tl.uint16).to(tl.int16, bitcast=True), mask=live)


def ema_config(n: int) -> dict:
    """Launch parameters of ``_ema_kernel`` for ``n`` elements: ``block`` and ``num_warps``.
    A streaming kernel: 4096 elements per program (32 per thread at 4 warps) keeps
    the loads wide and the grid large (~5,400 programs for a 22 M-parameter ViT-S teacher);
    no shared memory is staged (``tests/test_kernels_sm90.py`` checks the sm_90 compile)."""
    return dict(block=4096, num_warps=4)


def ema_flat_(teacher: torch.Tensor, student: torch.Tensor, momentum: float,
              teacher_bf16: torch.Tensor | None = None,
              block: int | None = None) -> torch.Tensor:
    """``teacher <- momentum·teacher + (1-momentum)·student`` in place over flat buffers.

    teacher, student: 1-D contiguous fp32/fp64 tensors of equal length and dtype on one device.
    teacher_bf16: optional 1-D bf16 buffer of the same length, set to the updated teacher.
    """
    n = teacher.numel()
    cfg = ema_config(n)
    block = block or cfg["block"]
    grid = (triton.cdiv(n, block),)
    weight = 1.0 - float(momentum)
    # a device scalar: no host sync, and fp64 buffers get an fp64 weight
    w = torch.full((1,), weight, dtype=teacher.dtype, device=teacher.device)
    t16 = teacher_bf16.view(torch.int16) if teacher_bf16 is not None else teacher
    _ema_kernel[grid](teacher, student, t16, w, n, BLOCK=block,
                      WRITE_BF16=teacher_bf16 is not None, HIGH_WEIGHT=weight >= 0.5,
                      num_warps=cfg["num_warps"])
    return teacher
