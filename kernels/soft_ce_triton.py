r"""Triton kernels of ``soft_ce``: weighted, centred, temperature-scaled soft-target cross-entropy.

The op (the maths; the autograd wrappers, checks and the torch fallback are in
``soft_ce.py`` in this package). Student rows ``i < M``, each with ``P`` partner teacher rows
``j = partner[i, p]`` and weights ``w[i, p]`` (``w = 0``: no pair; the partner is never read)::

    s~_i   = s_i / tau_s                        lse_i   = logsumexp_k s~_ik
    x_j    = (t_j - c) / tau_t                  lse_j   = logsumexp_k x_jk
    q_ik   = sum_p w_ip softmax(x_j(i,p))_k     W_i     = sum_p w_ip
    loss_i = sum_p w_ip CE(p_t, p_s) = sum_k q_ik (lse_i - s~_ik)
    dloss/ds_ik = (W_i softmax(s~_i)_k - q_ik) / tau_s

``sum_k q_ik (lse_i - s~_ik)`` sums non-negative terms (``-log_softmax >= 0``), so large logits
do not cancel catastrophically, unlike ``W_i lse_i - sum_k q_ik s~_ik``; and ``lse_i - s~_ik`` is
evaluated as ``log d_i - (s~_ik - m_i)`` (m: running max, d: sum of exp(s~ - m)), as torch's
log_softmax does, so logits of size 1e3 lose nothing to the rounding of ``m + log d``. The
division by the temperatures is a division (not a multiplication by 1/tau), again as in the eager
code, so both round the scaled logits identically. The gradient of a row is
accumulated over its partners inside one program: no atomics, deterministic.

Grouping the pairs by student row (a padded ``[M, P]`` table, ``P`` = most partners of a row:
``ng`` for iBOT's [CLS] pairs, 1 for patch rows) keeps shapes static and needs no sort; a
student row that appears in several pairs gets one fused gradient.

``_soft_ce_fwd_kernel`` (one program per student row, two passes over K in blocks of BLOCK_K):
  pass 1: online logsumexp of the student row and of its ``P_PAD`` partner rows (a
          ``[P_PAD, BLOCK_K]`` tile gathered by row index);
  pass 2: q, the loss terms and the gradient, written once in the student's dtype.
A row whose weights are all 0 (an unmasked patch token of the dense layout) reads nothing and
writes a zero gradient row. Every value is fp32 inside whatever the input dtypes; row offsets
are int64 (M*K can pass 2**31).

``_soft_ce_linear_*`` (fused-linear variant): logits are ``z_s W_s^T`` and ``z_t W_t^T`` (the
L2-normalised bottleneck vectors and the weight-normed last layer); they are recomputed per
``[BLOCK_M, BLOCK_K]`` tile with ``tl.dot`` and never stored. Forward (grid over row tiles):
teacher and student logsumexps (one pass per partner and one for the student), then the loss,
``dz_s = g W_s``; the row statistics are stored (``M (P + 1)`` floats). ``_soft_ce_linear_dw``
(grid over K blocks) recomputes ``g`` tile by tile and accumulates ``dW_s = g^T z_s``.

Pointers/strides: every 2-D input has unit column stride (the launchers make inputs contiguous
in K); row strides are passed explicitly. Constexprs: ``P`` (partners), ``P_PAD``
(next power of two), ``BLOCK_K``, and for the linear variant ``BLOCK_M``, ``BLOCK_D`` (>= D,
a power of two) and ``DOT_PRECISION`` (``soft_ce_linear_config``).

Temperatures: ``tau_s_ptr`` / ``tau_t_ptr`` point at one fp32 each, so a temperature held in a
tensor (the compiled step's per-epoch teacher temperature) never goes through the host.

Launches: ``soft_ce_fwd_config`` and ``soft_ce_linear_config`` pick the launch parameters per
shape and dtype; ``tests/test_kernels_sm90.py`` compiles what they pick at the iBOT shapes for
sm_90 (shared memory, registers, spills). The launchers call the kernels through
``torch.library.triton_op`` ops (``ibot_fast::soft_ce_fwd``, ``ibot_fast::soft_ce_fwd_inplace``,
``ibot_fast::soft_ce_linear_fwd``) and ``wrap_triton``: ``torch.compile`` traces them as ops
(no graph break) and inductor sees the kernels.

Under ``TRITON_INTERPRET=1`` (CPU tests) only fp32 is exact; libdevice is not used here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["soft_ce_fwd", "soft_ce_linear_fwd", "default_block_k", "soft_ce_fwd_config",
           "soft_ce_linear_config", "linear_tile_dtype"]


def default_block_k(K: int) -> int:
    # 1024 fp32 per program-block keeps registers in bounds at 8 warps; tiny K gets one block.
    return min(triton.next_power_of_2(K), 1024)


@triton.jit
def _soft_ce_fwd_kernel(
    s_ptr, s_row_stride,        # student logits [M, K], any float dtype
    t_ptr, t_row_stride,        # teacher logits [T, K], any float dtype
    partner_ptr, weight_ptr,    # [M, P] int64 teacher row per pair, [M, P] fp32 weight
    c_ptr,                      # centre [K] fp32
    g_ptr, g_row_stride,        # out: d loss / d student logits [M, K], student dtype
    loss_ptr,                   # out: [M] fp32 weighted loss of each student row
    K,
    tau_s_ptr, tau_t_ptr,       # the temperatures, one fp32 each (device scalars: no host sync)
    P: tl.constexpr, P_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    tau_s = tl.load(tau_s_ptr)
    tau_t = tl.load(tau_t_ptr)
    offs_p = tl.arange(0, P_PAD)
    in_p = offs_p < P
    w_P = tl.load(weight_ptr + row * P + offs_p, mask=in_p, other=0.0).to(tl.float32)
    live_P = w_P != 0.0
    partner_P = tl.load(partner_ptr + row * P + offs_p, mask=live_P, other=0).to(tl.int64)
    w_sum = tl.sum(w_P, axis=0)
    n_blocks = tl.cdiv(K, BLOCK_K)
    n_live = tl.where(tl.sum(live_P.to(tl.int32), axis=0) > 0, n_blocks, 0)
    s_row = s_ptr + row * s_row_stride
    t_rows_P = t_ptr + partner_P * t_row_stride
    offs_k = tl.arange(0, BLOCK_K)

    # ---- pass 1: online logsumexp of the student row and of the partner teacher rows ----
    m_s = -float("inf")
    d_s = 0.0
    m_t = tl.full([P_PAD], -float("inf"), tl.float32)
    d_t = tl.zeros([P_PAD], tl.float32)
    for kb in range(0, n_live):
        k = kb * BLOCK_K + offs_k
        in_k = k < K
        s = tl.load(s_row + k, mask=in_k, other=-float("inf")).to(tl.float32) / tau_s
        m_new = tl.maximum(m_s, tl.max(s, axis=0))
        d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m_s = m_new
        c = tl.load(c_ptr + k, mask=in_k, other=0.0)
        # dead partners load 0 (finite), so their statistics stay finite and weigh 0 below
        t = tl.load(t_rows_P[:, None] + k[None, :], mask=live_P[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        x = tl.where(in_k[None, :], (t - c[None, :]) / tau_t, -float("inf"))
        mt_new = tl.maximum(m_t, tl.max(x, axis=1))
        d_t = d_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(x - mt_new[:, None]), axis=1)
        m_t = mt_new
    # d >= 1 for a row that was read (its maximum contributes exp(0)); rows that were not
    # read (no live pair) keep d = 0 and their lse is never used: max(d, 1) avoids log(0).
    log_d_s = tl.log(tl.maximum(d_s, 1.0))
    log_d_t = tl.log(tl.maximum(d_t, 1.0))

    # ---- pass 2: teacher mixture q, loss terms and the gradient (one write per element) ----
    acc = tl.zeros([BLOCK_K], tl.float32)
    g_row = g_ptr + row * g_row_stride
    for kb in range(0, n_live):
        k = kb * BLOCK_K + offs_k
        in_k = k < K
        s = tl.load(s_row + k, mask=in_k, other=0.0).to(tl.float32) / tau_s
        c = tl.load(c_ptr + k, mask=in_k, other=0.0)
        t = tl.load(t_rows_P[:, None] + k[None, :], mask=live_P[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        x = (t - c[None, :]) / tau_t
        # (x - m) - log d, not x - (m + log d): rounding m + log d to fp32 would cost up to
        # half an ulp of m, i.e. a relative error ulp(m) in the probabilities of large logits.
        q = tl.sum(w_P[:, None] * tl.exp((x - m_t[:, None]) - log_d_t[:, None]), axis=0)
        neg_logp = log_d_s - (s - m_s)
        acc += tl.where(in_k, q * neg_logp, 0.0)
        g = (w_sum * tl.exp(-neg_logp) - q) / tau_s
        tl.store(g_row + k, g.to(g_ptr.dtype.element_ty), mask=in_k)
    # rows without a live pair: zero gradient, no reads
    for kb in range(0, n_blocks - n_live):
        k = kb * BLOCK_K + offs_k
        tl.store(g_row + k, tl.zeros([BLOCK_K], tl.float32).to(g_ptr.dtype.element_ty),
                 mask=k < K)
    tl.store(loss_ptr + row, tl.sum(acc, axis=0))


def soft_ce_fwd_config(K: int, P: int) -> dict:
    """Launch parameters of ``_soft_ce_fwd_kernel``: ``BLOCK_K`` and ``num_warps``.

    One program per student row keeps a ``[P_PAD, BLOCK_K]`` teacher tile and a few
    ``[BLOCK_K]`` vectors in registers, no shared-memory staging: at K = 8192, P <= 2, 8 warps,
    sm_90 needs 32 B of shared memory, ~40 registers, no spills (``tests/test_kernels_sm90.py``
    checks every configuration this returns at the iBOT shapes)."""
    block_k = default_block_k(K)
    return dict(block_k=block_k, num_warps=8 if block_k >= 1024 else 4)


def _as_scalar(v, device) -> torch.Tensor:
    """A temperature as the kernels read it: one fp32 on the tensors' device. A Python float
    becomes a fill (no sync); a tensor is reshaped/cast on the device, never read back."""
    if torch.is_tensor(v):
        return v.reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(v), dtype=torch.float32, device=device)


def _launch(kernel, grid, *args, **meta):
    """Launch ``kernel`` from inside a ``torch.library.triton_op``: wrapped by ``wrap_triton``
    (so ``torch.compile`` sees the kernel, no graph break) when triton compiles it; called
    directly under ``TRITON_INTERPRET=1``, where the kernel is an interpreter object that
    ``wrap_triton`` cannot trace. The interpreter needs real tensors: with fake tensors (shape
    propagation while dynamo traces) the launch is skipped -- the op's outputs are allocated
    by the caller -- and inside AOT functionalisation it is refused, since the graph would
    lose the kernel."""
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
        return
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor
    tensors = [a for a in args if torch.is_tensor(a)]
    if any(isinstance(a, FunctionalTensor) for a in tensors):
        raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) cannot run inside an "
                           "AOT-compiled graph; compile with backend='eager' or use the "
                           "'torch' back end of soft_ce on the CPU")
    if any(is_fake(a) for a in tensors):
        return
    kernel[grid](*args, **meta)


def _fwd_args(student_MK, teacher_TK, partner_MP, weight_MP, center_K, grad_MK, loss_M,
              tau_s, tau_t, block_k, num_warps):
    M, K = student_MK.shape
    P = partner_MP.shape[1]
    return ((M,), student_MK, student_MK.stride(0), teacher_TK, teacher_TK.stride(0),
            partner_MP, weight_MP, center_K, grad_MK, grad_MK.stride(0), loss_M, K, tau_s,
            tau_t), dict(P=P, P_PAD=triton.next_power_of_2(P), BLOCK_K=block_k,
                         num_warps=num_warps)


@torch.library.triton_op("ibot_fast::soft_ce_fwd", mutates_args=())
def _soft_ce_fwd_op(student_MK: torch.Tensor, teacher_TK: torch.Tensor,
                    partner_MP: torch.Tensor, weight_MP: torch.Tensor, center_K: torch.Tensor,
                    tau_s: torch.Tensor, tau_t: torch.Tensor, block_k: int,
                    num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_M, grad_MK): the kernel as an op ``torch.compile`` can trace (no graph break)."""
    grad_MK = torch.empty_like(student_MK, memory_format=torch.contiguous_format)
    loss_M = torch.empty(student_MK.shape[0], device=student_MK.device, dtype=torch.float32)
    (grid, *args), meta = _fwd_args(student_MK, teacher_TK, partner_MP, weight_MP, center_K,
                                    grad_MK, loss_M, tau_s, tau_t, block_k, num_warps)
    _launch(_soft_ce_fwd_kernel, grid, *args, **meta)
    return loss_M, grad_MK


@torch.library.triton_op("ibot_fast::soft_ce_fwd_inplace", mutates_args={"student_MK"})
def _soft_ce_fwd_inplace_op(student_MK: torch.Tensor, teacher_TK: torch.Tensor,
                            partner_MP: torch.Tensor, weight_MP: torch.Tensor,
                            center_K: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor,
                            block_k: int, num_warps: int) -> torch.Tensor:
    """loss_M; the gradient overwrites ``student_MK`` (contiguous). Declared as a mutation,
    so autograd's version counter of the student is bumped by the dispatcher."""
    loss_M = torch.empty(student_MK.shape[0], device=student_MK.device, dtype=torch.float32)
    (grid, *args), meta = _fwd_args(student_MK, teacher_TK, partner_MP, weight_MP, center_K,
                                    student_MK, loss_M, tau_s, tau_t, block_k, num_warps)
    _launch(_soft_ce_fwd_kernel, grid, *args, **meta)
    return loss_M


def soft_ce_fwd(student_MK: torch.Tensor, teacher_TK: torch.Tensor, partner_MP: torch.Tensor,
                weight_MP: torch.Tensor, center_K: torch.Tensor, tau_s, tau_t,
                block_k: int | None = None, num_warps: int | None = None,
                inplace: bool = False):
    """Launch the forward kernel. Inputs are already checked (``soft_ce._check_core``).

    ``tau_s``, ``tau_t``: Python floats or 1-element tensors; they reach the kernel as device
    scalars, never read back by the host. ``block_k`` / ``num_warps``: ``soft_ce_fwd_config``
    unless given.

    ``inplace`` (``inplace_grad``): write the gradient into ``student_MK`` itself (contiguous).
    Aliasing the student is safe: a program owns one row and, in pass 2, reads each block of it
    before writing that block's gradient; rows without a pair only write.

    Returns ``(loss_M fp32, grad_MK in the student's dtype)``."""
    M, K = student_MK.shape
    dev = student_MK.device
    if not inplace:
        student_MK = student_MK if student_MK.stride(-1) == 1 else student_MK.contiguous()
    teacher_TK = teacher_TK if teacher_TK.stride(-1) == 1 else teacher_TK.contiguous()
    partner_MP = partner_MP.contiguous()
    weight_MP = weight_MP.to(torch.float32).contiguous()
    center_K = center_K.reshape(-1).to(torch.float32).contiguous()
    cfg = soft_ce_fwd_config(K, partner_MP.shape[1])
    args = (student_MK, teacher_TK, partner_MP, weight_MP, center_K, _as_scalar(tau_s, dev),
            _as_scalar(tau_t, dev), block_k or cfg["block_k"], num_warps or cfg["num_warps"])
    if M == 0:
        return (torch.empty(0, device=dev, dtype=torch.float32),
                student_MK if inplace else torch.empty_like(student_MK))
    if inplace:
        return torch.ops.ibot_fast.soft_ce_fwd_inplace(*args), student_MK
    return torch.ops.ibot_fast.soft_ce_fwd(*args)


# ---- fused-linear variant --------------------------------------------------------------------
@triton.jit
def _weight_tile(w_ptr, w_row_stride, k, in_k, offs_d, in_d):
    """Rows k of a last-layer weight [K, D] as an fp32 [BLOCK_K, BLOCK_D] tile (0 outside)."""
    return tl.load(w_ptr + k[:, None].to(tl.int64) * w_row_stride + offs_d[None, :],
                   mask=in_k[:, None] & in_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _grad_dot(acc, a, b, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` where ``a`` is an fp32 gradient tile and ``b`` holds values exact in the
    dot's input format (bf16/fp16 data under "tf32"). A TF32 dot would round ``a`` to a 10-bit
    mantissa; split as ``a_hi + a_lo`` (``a_hi``: ``a`` with the 13 low mantissa bits cleared,
    exact in TF32; ``a_lo = a - a_hi`` exact in fp32) two dots lose only ``a_lo``'s rounding,
    about 2**-22 of ``a``: fp32-level gradients for one extra dot."""
    if DOT_PRECISION == "tf32":
        a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        acc = tl.dot(a_hi, b, acc, input_precision="tf32")
        return tl.dot(a - a_hi, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _row_weight_sum(weight_ptr, rows, in_m, P: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum_p weight[row, p] for a block of student rows."""
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    for p in tl.static_range(P):
        w_sum += tl.load(weight_ptr + rows * P + p, mask=in_m, other=0.0)
    return w_sum


@triton.jit
def _teacher_tile_logits(zt_ptr, zt_row_stride, wt_ptr, wt_row_stride, c_ptr, partner_M,
                         live_M, k, in_k, offs_d, in_d, inv_tau_t,
                         DOT_PRECISION: tl.constexpr):
    """(t - c)/tau_t for a [BLOCK_M, BLOCK_K] tile; rows gathered by partner index."""
    zt = tl.load(zt_ptr + partner_M[:, None] * zt_row_stride + offs_d[None, :],
                 mask=live_M[:, None] & in_d[None, :], other=0.0).to(tl.float32)
    wt = _weight_tile(wt_ptr, wt_row_stride, k, in_k, offs_d, in_d)
    t = tl.dot(zt, tl.trans(wt), input_precision=DOT_PRECISION)
    c = tl.load(c_ptr + k, mask=in_k, other=0.0)
    return (t - c[None, :]) * inv_tau_t


@triton.jit
def _teacher_target_tile(zt_ptr, zt_row_stride, wt_ptr, wt_row_stride, c_ptr, partner_ptr,
                         weight_ptr, lse_t_ptr, rows, in_m, k, in_k, offs_d, in_d, inv_tau_t,
                         P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """sum_p w_p softmax((t_p - c)/tau_t) on a [BLOCK_M, BLOCK_K] tile, with each partner's
    logsumexp from the first pass (lse_t); shared by the loss/dz and the dW kernels."""
    q = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for p in tl.static_range(P):
        w_p = tl.load(weight_ptr + rows * P + p, mask=in_m, other=0.0)
        live = w_p != 0.0
        partner = tl.load(partner_ptr + rows * P + p, mask=live, other=0).to(tl.int64)
        lse_p = tl.load(lse_t_ptr + rows * P + p, mask=in_m, other=0.0)
        x = _teacher_tile_logits(zt_ptr, zt_row_stride, wt_ptr, wt_row_stride, c_ptr,
                                 partner, live, k, in_k, offs_d, in_d, inv_tau_t,
                                 DOT_PRECISION)
        q += w_p[:, None] * tl.exp(x - lse_p[:, None])
    return q


@triton.jit
def _soft_ce_linear_fwd_kernel(
    zs_ptr, zs_row_stride,      # student bottleneck [M, D]
    ws_ptr, ws_row_stride,      # student last layer [K, D]
    zt_ptr, zt_row_stride,      # teacher bottleneck [T, D]
    wt_ptr, wt_row_stride,      # teacher last layer [K, D]
    partner_ptr, weight_ptr,    # [M, P] int64, [M, P] fp32
    c_ptr,                      # centre [K] fp32
    dzs_ptr,                    # out: d loss / d z_s [M, D] fp32
    loss_ptr,                   # out: [M] fp32
    lse_s_ptr, lse_t_ptr,       # out: [M], [M, P] fp32 row statistics for the dW kernel
    M, K, D,
    tau_s_ptr, tau_t_ptr,       # the temperatures, one fp32 each (device scalars: no host sync)
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    inv_tau_s = 1.0 / tl.load(tau_s_ptr)
    inv_tau_t = 1.0 / tl.load(tau_t_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    zs = tl.load(zs_ptr + rows[:, None] * zs_row_stride + offs_d[None, :],
                 mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float32)
    n_blocks = tl.cdiv(K, BLOCK_K)

    # teacher logsumexp, one pass over K per partner (stored: pass 2 and the dW kernel reread)
    for p in tl.static_range(P):
        w_p = tl.load(weight_ptr + rows * P + p, mask=in_m, other=0.0)
        live = w_p != 0.0
        partner = tl.load(partner_ptr + rows * P + p, mask=live, other=0).to(tl.int64)
        m_t = tl.full([BLOCK_M], -float("inf"), tl.float32)
        d_t = tl.zeros([BLOCK_M], tl.float32)
        for kb in range(0, n_blocks):
            k = kb * BLOCK_K + offs_k
            in_k = k < K
            x = _teacher_tile_logits(zt_ptr, zt_row_stride, wt_ptr, wt_row_stride, c_ptr,
                                     partner, live, k, in_k, offs_d, in_d, inv_tau_t,
                                     DOT_PRECISION)
            x = tl.where(in_k[None, :], x, -float("inf"))
            m_new = tl.maximum(m_t, tl.max(x, axis=1))
            d_t = d_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m_t = m_new
        tl.store(lse_t_ptr + rows * P + p, m_t + tl.log(d_t), mask=in_m)

    # student logsumexp
    m_s = tl.full([BLOCK_M], -float("inf"), tl.float32)
    d_s = tl.zeros([BLOCK_M], tl.float32)
    for kb in range(0, n_blocks):
        k = kb * BLOCK_K + offs_k
        in_k = k < K
        ws = _weight_tile(ws_ptr, ws_row_stride, k, in_k, offs_d, in_d)
        s = tl.dot(zs, tl.trans(ws), input_precision=DOT_PRECISION) * inv_tau_s
        s = tl.where(in_k[None, :], s, -float("inf"))
        m_new = tl.maximum(m_s, tl.max(s, axis=1))
        d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_s = m_new
    lse_s = m_s + tl.log(d_s)
    tl.store(lse_s_ptr + rows, lse_s, mask=in_m)

    # loss terms and d z_s = g W_s
    w_sum = _row_weight_sum(weight_ptr, rows, in_m, P, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    dzs = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for kb in range(0, n_blocks):
        k = kb * BLOCK_K + offs_k
        in_k = k < K
        ws = _weight_tile(ws_ptr, ws_row_stride, k, in_k, offs_d, in_d)
        s = tl.dot(zs, tl.trans(ws), input_precision=DOT_PRECISION) * inv_tau_s
        q = _teacher_target_tile(zt_ptr, zt_row_stride, wt_ptr, wt_row_stride, c_ptr,
                                 partner_ptr, weight_ptr, lse_t_ptr, rows, in_m, k, in_k,
                                 offs_d, in_d, inv_tau_t, P, BLOCK_M, BLOCK_K, DOT_PRECISION)
        neg_logp = lse_s[:, None] - s
        keep = in_k[None, :] & in_m[:, None]
        acc += tl.where(keep, q * neg_logp, 0.0)
        g = tl.where(keep, (w_sum[:, None] * tl.exp(-neg_logp) - q) * inv_tau_s, 0.0)
        dzs = _grad_dot(dzs, g, ws, DOT_PRECISION)
    tl.store(dzs_ptr + rows[:, None] * D + offs_d[None, :], dzs,
             mask=in_m[:, None] & in_d[None, :])
    tl.store(loss_ptr + rows, tl.sum(acc, axis=1), mask=in_m)


@triton.jit
def _soft_ce_linear_dw_kernel(
    zs_ptr, zs_row_stride, ws_ptr, ws_row_stride, zt_ptr, zt_row_stride, wt_ptr, wt_row_stride,
    partner_ptr, weight_ptr, c_ptr, lse_s_ptr, lse_t_ptr,
    dws_ptr,                    # out: d loss / d W_s [K, D] fp32
    M, K, D,
    tau_s_ptr, tau_t_ptr,       # the temperatures, one fp32 each
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    inv_tau_s = 1.0 / tl.load(tau_s_ptr)
    inv_tau_t = 1.0 / tl.load(tau_t_ptr)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = k < K
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    ws = _weight_tile(ws_ptr, ws_row_stride, k, in_k, offs_d, in_d)
    dws = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for mb in range(0, tl.cdiv(M, BLOCK_M)):
        rows = (mb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        in_m = rows < M
        zs = tl.load(zs_ptr + rows[:, None] * zs_row_stride + offs_d[None, :],
                     mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        s = tl.dot(zs, tl.trans(ws), input_precision=DOT_PRECISION) * inv_tau_s
        lse_s = tl.load(lse_s_ptr + rows, mask=in_m, other=0.0)
        q = _teacher_target_tile(zt_ptr, zt_row_stride, wt_ptr, wt_row_stride, c_ptr,
                                 partner_ptr, weight_ptr, lse_t_ptr, rows, in_m, k, in_k,
                                 offs_d, in_d, inv_tau_t, P, BLOCK_M, BLOCK_K, DOT_PRECISION)
        w_sum = _row_weight_sum(weight_ptr, rows, in_m, P, BLOCK_M)
        keep = in_k[None, :] & in_m[:, None]
        g = tl.where(keep, (w_sum[:, None] * tl.exp(s - lse_s[:, None]) - q) * inv_tau_s, 0.0)
        dws = _grad_dot(dws, tl.trans(g), zs, DOT_PRECISION)
    tl.store(dws_ptr + k[:, None].to(tl.int64) * D + offs_d[None, :], dws,
             mask=in_k[:, None] & in_d[None, :])


def linear_tile_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the fused-linear kernels read all four inputs in: the half dtype if any input
    is bf16/fp16 (so an fp32 last-layer weight meets bf16 bottleneck vectors in bf16, as
    ``F.linear`` under autocast computes the reference's logits), else fp32."""
    for t in tensors:
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.dtype
    return torch.float32


def _clamp_block(K: int, block: int) -> int:
    return max(min(triton.next_power_of_2(K), block), 16)  # tl.dot: every tile dim >= 16


def soft_ce_linear_config(M: int, K: int, D: int, P: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the fused-linear kernels: ``{"fwd": {...}, "dw": {...},
    "tile_dtype": ...}``, each kernel's with ``BLOCK_M``, ``BLOCK_K``, ``BLOCK_D``,
    ``DOT_PRECISION``, ``num_warps``, ``num_stages``; ``tile_dtype`` is the dtype the launcher
    hands the kernels (the inputs' own: bf16/fp16 tiles are upcast after the load).

    Shared memory bounds the tiles: each K step stages a ``[BLOCK_K, BLOCK_D]`` weight tile per
    pipeline stage beside the ``[BLOCK_M, BLOCK_D]`` bottleneck rows. At D = 256 the former
    32/128/256 tiles with 3 stages needed 607 KB (forward) and 345 KB (dW) against the H200's
    232,448 B per block. ``BLOCK_K = 32`` (forward) and 16 (dW: its program also holds a
    ``[BLOCK_K, BLOCK_D]`` accumulator and weight tile across its loop over row tiles), 2
    stages and 8 warps fit with no register spills. ``tests/test_kernels_sm90.py`` compiles
    every configuration this returns at the iBOT shapes for sm_90 and checks shared memory and
    spills.

    ``dtype`` is the tile dtype (``linear_tile_dtype``). ``DOT_PRECISION`` is ``"tf32"`` for
    bf16/fp16 tiles: the products ``z W^T`` are exact (bf16/fp16 values are exact in TF32); the
    fp32 gradient tiles ``g`` enter ``g W`` and ``g^T z`` split in two TF32 parts
    (``_grad_dot``), so they lose ~2**-22 of their value, not TF32's 2**-11; logsumexps, loss
    terms and every accumulation stay fp32. fp32 tiles get ``"ieee"`` (exact products), which only
    the interpreter runs (CPU tests): compiled for sm_90 at D = 256, "ieee" and "tf32x3" dots
    spill hundreds of bytes to kilobytes of registers and take minutes to compile, so the op
    layer sends fp32 inputs on CUDA to its torch back end (``soft_ce.soft_ce_linear``).
    """
    block_d = max(triton.next_power_of_2(D), 16)
    small_d = block_d <= 128
    precision = "ieee" if dtype == torch.float32 else "tf32"
    fwd = dict(BLOCK_M=32, BLOCK_K=_clamp_block(K, 64 if small_d else 32), BLOCK_D=block_d,
               DOT_PRECISION=precision, num_warps=8, num_stages=2)
    dw = dict(BLOCK_M=32, BLOCK_K=_clamp_block(K, 32 if small_d else 16), BLOCK_D=block_d,
              DOT_PRECISION=precision, num_warps=8, num_stages=2)
    return {"fwd": fwd, "dw": dw, "tile_dtype": dtype}


def _linear_args(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K):
    return (zs_MD, zs_MD.stride(0), ws_KD, ws_KD.stride(0), zt_TD, zt_TD.stride(0), wt_KD,
            wt_KD.stride(0), partner_MP, weight_MP, center_K)


@torch.library.triton_op("ibot_fast::soft_ce_linear_fwd", mutates_args=())
def _soft_ce_linear_op(zs_MD: torch.Tensor, ws_KD: torch.Tensor, zt_TD: torch.Tensor,
                       wt_KD: torch.Tensor, partner_MP: torch.Tensor, weight_MP: torch.Tensor,
                       center_K: torch.Tensor, tau_s: torch.Tensor, tau_t: torch.Tensor,
                       fwd_blocks: list[int], dw_blocks: list[int], fwd_launch: list[int],
                       dw_launch: list[int],
                       dot_precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_M, dzs_MD, dws_KD), fp32. ``*_blocks`` = (BLOCK_M, BLOCK_K, BLOCK_D),
    ``*_launch`` = (num_warps, num_stages) of the forward and dW kernels."""
    M, D = zs_MD.shape
    K = ws_KD.shape[0]
    P = partner_MP.shape[1]
    dev = zs_MD.device
    loss_M = torch.empty(M, device=dev, dtype=torch.float32)
    dzs_MD = torch.empty(M, D, device=dev, dtype=torch.float32)
    dws_KD = torch.empty(K, D, device=dev, dtype=torch.float32)
    lse_s_M = torch.empty(M, device=dev, dtype=torch.float32)
    lse_t_MP = torch.empty(M, P, device=dev, dtype=torch.float32)
    common = _linear_args(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K)
    bm, bk, bd = fwd_blocks
    _launch(_soft_ce_linear_fwd_kernel, (triton.cdiv(M, bm),), *common, dzs_MD, loss_M,
            lse_s_M, lse_t_MP, M, K, D, tau_s, tau_t, P=P, BLOCK_M=bm, BLOCK_K=bk,
            BLOCK_D=bd, DOT_PRECISION=dot_precision, num_warps=fwd_launch[0],
            num_stages=fwd_launch[1])
    bm, bk, bd = dw_blocks
    _launch(_soft_ce_linear_dw_kernel, (triton.cdiv(K, bk),), *common, lse_s_M, lse_t_MP,
            dws_KD, M, K, D, tau_s, tau_t, P=P, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd,
            DOT_PRECISION=dot_precision, num_warps=dw_launch[0], num_stages=dw_launch[1])
    return loss_M, dzs_MD, dws_KD


def soft_ce_linear_fwd(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K,
                       tau_s, tau_t, block_m: int | None = None, block_k: int | None = None,
                       num_warps: int | None = None):
    """Launch the fused-linear forward and dW kernels (inputs checked by the caller).

    ``tau_s``, ``tau_t``: Python floats or 1-element tensors (device scalars for the kernels).
    Launch parameters: ``soft_ce_linear_config``; ``block_m`` / ``block_k`` / ``num_warps``
    override it for both kernels (tests use small tiles).

    Returns ``(loss_M, dzs_MD, dws_KD)``, all fp32."""
    M, D = zs_MD.shape
    K = ws_KD.shape[0]
    P = partner_MP.shape[1]
    dev = zs_MD.device
    cfg = soft_ce_linear_config(M, K, D, P, linear_tile_dtype(zs_MD, ws_KD, zt_TD, wt_KD))
    # one tile dtype for the four inputs, unit column stride (no copy when they already are)
    zs_MD, ws_KD, zt_TD, wt_KD = (x.to(cfg["tile_dtype"]).contiguous()
                                  for x in (zs_MD, ws_KD, zt_TD, wt_KD))
    partner_MP = partner_MP.contiguous()
    weight_MP = weight_MP.to(torch.float32).contiguous()
    center_K = center_K.reshape(-1).to(torch.float32).contiguous()
    if M == 0:
        return (torch.empty(0, device=dev, dtype=torch.float32),
                torch.empty(0, D, device=dev, dtype=torch.float32),
                torch.zeros(K, D, device=dev, dtype=torch.float32))
    blocks, launch = [], []
    for c in (cfg["fwd"], cfg["dw"]):
        # tl.dot needs every tile dimension >= 16
        blocks.append([max(block_m or c["BLOCK_M"], 16), max(block_k or c["BLOCK_K"], 16),
                       c["BLOCK_D"]])
        launch.append([num_warps or c["num_warps"], c["num_stages"]])
    return torch.ops.ibot_fast.soft_ce_linear_fwd(
        zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K, _as_scalar(tau_s, dev),
        _as_scalar(tau_t, dev), blocks[0], blocks[1], launch[0], launch[1],
        cfg["fwd"]["DOT_PRECISION"])
