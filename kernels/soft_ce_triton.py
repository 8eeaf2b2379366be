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
a power of two) and ``DOT_PRECISION`` ("ieee" for fp32 inputs so no TF32 rounding enters).

Under ``TRITON_INTERPRET=1`` (CPU tests) only fp32 is exact; libdevice is not used here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["soft_ce_fwd", "soft_ce_linear_fwd", "default_block_k"]


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
    K, tau_s, tau_t,
    P: tl.constexpr, P_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
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


def soft_ce_fwd(student_MK: torch.Tensor, teacher_TK: torch.Tensor, partner_MP: torch.Tensor,
                weight_MP: torch.Tensor, center_K: torch.Tensor, tau_s: float,
                tau_t: float, block_k: int | None = None, num_warps: int | None = None,
                grad_out: torch.Tensor | None = None):
    """Launch the forward kernel. Inputs are already checked (``soft_ce._check_core``).

    ``grad_out``: where to write the gradient (``inplace_grad``: the student tensor itself,
    contiguous). Aliasing the student is safe: a program owns one row and, in pass 2, reads
    each block of it before writing that block's gradient; rows without a pair only write.

    Returns ``(loss_M fp32, grad_MK in the student's dtype)``."""
    M, K = student_MK.shape
    P = partner_MP.shape[1]
    student_MK = student_MK if student_MK.stride(-1) == 1 else student_MK.contiguous()
    teacher_TK = teacher_TK if teacher_TK.stride(-1) == 1 else teacher_TK.contiguous()
    partner_MP = partner_MP.contiguous()
    weight_MP = weight_MP.to(torch.float32).contiguous()
    center_K = center_K.reshape(-1).to(torch.float32).contiguous()
    grad_MK = grad_out if grad_out is not None else \
        torch.empty_like(student_MK, memory_format=torch.contiguous_format)
    loss_M = torch.empty(M, device=student_MK.device, dtype=torch.float32)
    if M == 0:
        return loss_M, grad_MK
    block_k = block_k or default_block_k(K)
    _soft_ce_fwd_kernel[(M,)](
        student_MK, student_MK.stride(0), teacher_TK, teacher_TK.stride(0),
        partner_MP, weight_MP, center_K, grad_MK, grad_MK.stride(0), loss_M,
        K, float(tau_s), float(tau_t),
        P=P, P_PAD=triton.next_power_of_2(P), BLOCK_K=block_k,
        num_warps=num_warps or (8 if block_k >= 1024 else 4))
    return loss_M, grad_MK


# ---- fused-linear variant --------------------------------------------------------------------
@triton.jit
def _weight_tile(w_ptr, w_row_stride, k, in_k, offs_d, in_d):
    """Rows k of a last-layer weight [K, D] as an fp32 [BLOCK_K, BLOCK_D] tile (0 outside)."""
    return tl.load(w_ptr + k[:, None].to(tl.int64) * w_row_stride + offs_d[None, :],
                   mask=in_k[:, None] & in_d[None, :], other=0.0).to(tl.float32)


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
    M, K, D, inv_tau_s, inv_tau_t,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
        dzs += tl.dot(g, ws, input_precision=DOT_PRECISION)
    tl.store(dzs_ptr + rows[:, None] * D + offs_d[None, :], dzs,
             mask=in_m[:, None] & in_d[None, :])
    tl.store(loss_ptr + rows, tl.sum(acc, axis=1), mask=in_m)


@triton.jit
def _soft_ce_linear_dw_kernel(
    zs_ptr, zs_row_stride, ws_ptr, ws_row_stride, zt_ptr, zt_row_stride, wt_ptr, wt_row_stride,
    partner_ptr, weight_ptr, c_ptr, lse_s_ptr, lse_t_ptr,
    dws_ptr,                    # out: d loss / d W_s [K, D] fp32
    M, K, D, inv_tau_s, inv_tau_t,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
        dws += tl.dot(tl.trans(g), zs, input_precision=DOT_PRECISION)
    tl.store(dws_ptr + k[:, None].to(tl.int64) * D + offs_d[None, :], dws,
             mask=in_k[:, None] & in_d[None, :])


def soft_ce_linear_fwd(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K,
                       inv_tau_s: float, inv_tau_t: float, block_m: int = 32,
                       block_k: int | None = None, num_warps: int | None = None):
    """Launch the fused-linear forward and dW kernels (inputs checked by the caller).

    Returns ``(loss_M, dzs_MD, dws_KD)``, all fp32."""
    M, D = zs_MD.shape
    K = ws_KD.shape[0]
    P = partner_MP.shape[1]
    zs_MD, ws_KD, zt_TD, wt_KD = (x if x.stride(-1) == 1 else x.contiguous()
                                  for x in (zs_MD, ws_KD, zt_TD, wt_KD))
    partner_MP = partner_MP.contiguous()
    weight_MP = weight_MP.to(torch.float32).contiguous()
    center_K = center_K.reshape(-1).to(torch.float32).contiguous()
    dev = zs_MD.device
    loss_M = torch.empty(M, device=dev, dtype=torch.float32)
    dzs_MD = torch.empty(M, D, device=dev, dtype=torch.float32)
    dws_KD = torch.empty(K, D, device=dev, dtype=torch.float32)
    lse_s_M = torch.empty(M, device=dev, dtype=torch.float32)
    lse_t_MP = torch.empty(M, P, device=dev, dtype=torch.float32)
    if M == 0:
        return loss_M, dzs_MD, dws_KD.zero_()
    block_k = block_k or min(triton.next_power_of_2(K), 128)
    block_k = max(block_k, 16)  # tl.dot needs every tile dimension >= 16
    block_m = max(block_m, 16)
    block_d = max(triton.next_power_of_2(D), 16)
    precision = "ieee" if zs_MD.dtype == torch.float32 else "tf32"
    meta = dict(P=P, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d,
                DOT_PRECISION=precision, num_warps=num_warps or 4)
    common = (zs_MD, zs_MD.stride(0), ws_KD, ws_KD.stride(0), zt_TD, zt_TD.stride(0),
              wt_KD, wt_KD.stride(0), partner_MP, weight_MP, center_K)
    _soft_ce_linear_fwd_kernel[(triton.cdiv(M, block_m),)](
        *common, dzs_MD, loss_M, lse_s_M, lse_t_MP, M, K, D, float(inv_tau_s),
        float(inv_tau_t), **meta)
    _soft_ce_linear_dw_kernel[(triton.cdiv(K, block_k),)](
        *common, lse_s_M, lse_t_MP, dws_KD, M, K, D, float(inv_tau_s), float(inv_tau_t),
        **meta)
    return loss_M, dzs_MD, dws_KD
