r"""Sinkhorn-Knopp teacher centring (DINOv2/v3's ``sinkhorn_knopp_teacher``), written once.

Two public forms of the same computation:

* ``sinkhorn_knopp_center`` -- the vector ``c`` for which ``softmax((t - c)/tau)`` *is* the
  Sinkhorn-Knopp target of every teacher row, so the fused soft-target CE op
  (``ibot_fast.kernels.soft_ce``) takes it as its ``center_K`` like the EMA centre and no
  ``[T, K]`` target tensor is made (``IBOTLoss``, ``DINOv2PatchLoss``);
* ``sinkhorn_knopp_targets`` -- the targets themselves, ``[T, K]`` rows summing to 1, computed
  from that centre in fp64 (``IBOTLossReference``, ``DINOv2PatchLoss.sinkhorn_knopp_teacher``).

Derivation (in ``sinkhorn_knopp_center``'s docstring): DINOv2 alternates prototype-row and
sample-column normalisations of ``Q = exp(t/tau)^T``; every step multiplies ``Q`` by a diagonal
matrix, so the result is ``softmax(t_i/tau + log a)`` for one prototype scale vector ``a``. The
iterations run in the log domain: no overflow where ``exp(t/tau)`` would overflow (DINOv2's
fp32 code does beyond ``t/tau`` ~ 88), and no 0/0 where it would underflow.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ibot_fast.dist import get_world_size

__all__ = ["sinkhorn_knopp_center", "sinkhorn_knopp_targets"]


def _chunk_rows(K: int) -> int:
    # 512k elements (2 MB fp32) per temporary: big enough for vectorised loops, small
    # enough that the temporaries stay far below a [T, K] tensor.
    return max(1, (1 << 19) // max(K, 1))


def _all_reduce_logsumexp(lse_K: torch.Tensor) -> torch.Tensor:
    """log(sum over ranks of exp(lse_K)), elementwise, without overflow (max, then sum)."""
    if get_world_size() == 1:
        return lse_K
    m = lse_K.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: stays -inf below
    s = torch.exp(lse_K - m)
    dist.all_reduce(s)
    return torch.log(s) + m


def _check_args(teacher_TK, teacher_temp, n_iterations, row_valid_T):
    if not torch.is_tensor(teacher_TK) or not teacher_TK.is_floating_point() \
            or teacher_TK.dim() != 2:
        raise ValueError(f"teacher_TK must be a floating [T, K] tensor, got "
                         f"{getattr(teacher_TK, 'dtype', type(teacher_TK).__name__)} "
                         f"{tuple(getattr(teacher_TK, 'shape', ()))}")
    if torch.is_tensor(teacher_temp):
        if teacher_temp.numel() != 1 or not teacher_temp.is_floating_point():
            raise ValueError(f"teacher_temp must be a float or a 1-element float tensor, got "
                             f"{teacher_temp.dtype} {tuple(teacher_temp.shape)}")
    elif not float(teacher_temp) > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
    T = teacher_TK.shape[0]
    if row_valid_T is not None and (not torch.is_tensor(row_valid_T)
                                    or tuple(row_valid_T.shape) != (T,)):
        raise ValueError(f"row_valid_T must be a [T={T}] tensor, got "
                         f"{tuple(getattr(row_valid_T, 'shape', ()))}")


@torch.no_grad()
def sinkhorn_knopp_center(teacher_TK: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                          *, row_valid_T: Optional[torch.Tensor] = None,
                          chunk_rows: Optional[int] = None) -> torch.Tensor:
    r"""The centre ``c_K`` for which ``softmax((t_i - c)/teacher_temp)`` is DINOv2/v3's
    Sinkhorn-Knopp target of teacher row i (fp32; fp64 for fp64 input). Feed it to ``soft_ce``
    as ``center_K`` with the same temperature.

    DINOv2's ``sinkhorn_knopp_teacher`` starts from ``Q = exp(t/tau)^T`` ([K, T]) and, for
    ``n_iterations``, divides every prototype row by its sum (all-reduced over ranks) and every
    sample column by its sum, with constant factors ``1/sum(Q)``, ``1/K``, ``1/B`` between. Each
    step multiplies ``Q`` by a diagonal matrix from the left (prototype scale ``a_k``) or from the
    right (sample scale ``b_i``), so ``Q_ki = exp(t_ik/tau) a_k b_i``; the constants cancel. The
    last step normalises each sample column to 1, hence target_i = ``softmax_k(t_ik/tau + log
    a_k)`` = ``softmax((t_i - c)/tau)`` with ``c = -tau log a``. In the log domain (no overflow
    where ``exp(t/tau)`` would overflow fp32), starting from ``log b_i = 0``::

        rho_k   = logsumexp_i (t_ik/tau + log b_i)      (over the valid rows of every rank)
        log b_i = -logsumexp_k (t_ik/tau - rho_k)       (between iterations; local to the row)
        c_k     = tau * rho_k                           (rho of the last iteration)

    ``row_valid_T`` (bool ``[T]``, optional): rows that are samples -- DINOv2's masked-token
    variant, where the count of masked tokens (``n_masked_patches_tensor``) is all-reduced; in
    log form that count cancels, and padding rows (a static-shape buffer) are excluded instead.
    With an initialised process group the prototype sums cover every rank (two all-reduces of K
    floats per iteration); no host syncs. Without any valid row the centre is 0.
    """
    _check_args(teacher_TK, teacher_temp, n_iterations, row_valid_T)
    T, K = teacher_TK.shape
    cdt = torch.float64 if teacher_TK.dtype == torch.float64 else torch.float32
    tau = float(teacher_temp)
    chunk = chunk_rows or _chunk_rows(K)
    t = teacher_TK.detach()
    if row_valid_T is None:
        valid_T = torch.ones(T, dtype=torch.bool, device=t.device)
    else:
        valid_T = row_valid_T.to(device=t.device, dtype=torch.bool)
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=t.device)
    log_b_T = torch.where(valid_T, torch.zeros((), dtype=cdt, device=t.device), neg_inf)
    rho_K = torch.full((K,), float("-inf"), dtype=cdt, device=t.device)
    for it in range(n_iterations):
        parts = [torch.logsumexp(t[a:a + chunk].to(cdt) / tau + log_b_T[a:a + chunk, None], dim=0)
                 for a in range(0, T, chunk)]
        if parts:
            rho_K = torch.logsumexp(torch.stack(parts), dim=0)
        rho_K = _all_reduce_logsumexp(rho_K)
        if it + 1 < n_iterations:
            log_b_T = torch.cat([
                -torch.logsumexp(t[a:a + chunk].to(cdt) / tau - rho_K, dim=1)
                for a in range(0, T, chunk)]) if T else log_b_T
            log_b_T = torch.where(valid_T, log_b_T, neg_inf)
    c_K = rho_K * tau
    return torch.where(torch.isfinite(c_K), c_K, torch.zeros_like(c_K))


@torch.no_grad()
def sinkhorn_knopp_targets(teacher_TK: torch.Tensor, teacher_temp: float,
                           n_iterations: int = 3, *,
                           row_valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DINOv2/v3's Sinkhorn-Knopp teacher targets, dense: ``[T, K]`` rows summing to 1 (fp32;
    fp64 for fp64 input); rows outside ``row_valid_T`` are not samples and get 0.

    ``softmax((t - c)/teacher_temp)`` with ``c = sinkhorn_knopp_center(t, ...)``, both in fp64
    (the eager ground truth: the targets of a cold teacher are exponentials of logits spanning
    hundreds of units, where fp32 rounding of ``t - c`` would show). Arguments and collectives
    as in ``sinkhorn_knopp_center``.
    """
    out_dtype = torch.float64 if teacher_TK.dtype == torch.float64 else torch.float32
    _check_args(teacher_TK, teacher_temp, n_iterations, row_valid_T)
    t = teacher_TK.detach().double()
    c_K = sinkhorn_knopp_center(t, teacher_temp, n_iterations, row_valid_T=row_valid_T)
    q_TK = torch.softmax((t - c_K) / float(teacher_temp), dim=-1)
    if row_valid_T is not None:
        q_TK = q_TK * row_valid_T.to(device=q_TK.device, dtype=q_TK.dtype)[:, None]
    return q_TK.to(out_dtype)
