r"""Sinkhorn-Knopp centring and flat pair lists for ``soft_ce``, plus the op's old import path.

The op itself -- ``soft_ce``, ``soft_ce_linear``, ``teacher_col_sum``, the back ends and their
checks -- lives in ``ibot_fast.kernels.soft_ce`` (the bottom of the import graph) and is
re-exported here, so ``from ibot_fast.fused_loss import soft_ce`` keeps working.

Sinkhorn-Knopp centring (DINOv2/v3's ``sinkhorn_knopp_teacher``) is a centre too:
``sinkhorn_knopp_center`` returns the vector ``c`` for which ``softmax((t - c)/tau_t)`` *is* the
Sinkhorn-Knopp target, so ``soft_ce`` fuses it like the EMA centre (derivation in its docstring).
``pairs_to_table`` turns a flat pair list into the student-major tables.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum", "sinkhorn_knopp_center",
           "pairs_to_table", "resolve_backend", "BACKENDS"]

# ---- the op (soft_ce, soft_ce_linear, back ends, checks): moved to ibot_fast.kernels.soft_ce --
from ibot_fast.kernels.soft_ce import (  # noqa: E402,F401 - re-exports
    _FLOATS, BACKENDS, _check_center, _check_core, _check_finite, _check_float, _check_inplace,
    _check_pairs, _check_temps, _chunk_terms, _compute_dtype, _default_chunk_rows, _SoftCE,
    _soft_ce_linear_torch, _soft_ce_torch, _SoftCELinear, _temp, _triton_available,
    resolve_backend, soft_ce, soft_ce_linear, teacher_col_sum)


# ---- Sinkhorn-Knopp centring -------------------------------------------------------------------
def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_logsumexp(lse_K: torch.Tensor) -> torch.Tensor:
    """log(sum over ranks of exp(lse_K)), elementwise, without overflow (max, then sum)."""
    if _world_size() == 1:
        return lse_K
    m = lse_K.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: stays -inf below
    s = torch.exp(lse_K - m)
    dist.all_reduce(s)
    return torch.log(s) + m


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
    _check_float("teacher_TK", teacher_TK, 2)
    _check_temps(1.0, teacher_temp)
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
    T, K = teacher_TK.shape
    cdt = _compute_dtype(teacher_TK)
    tau = float(teacher_temp)
    chunk = chunk_rows or _default_chunk_rows(K)
    t = teacher_TK.detach()
    if row_valid_T is None:
        valid_T = torch.ones(T, dtype=torch.bool, device=t.device)
    else:
        if not torch.is_tensor(row_valid_T) or tuple(row_valid_T.shape) != (T,):
            raise ValueError(f"row_valid_T must be a [T={T}] tensor, got "
                             f"{tuple(getattr(row_valid_T, 'shape', ()))}")
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


# ---- flat pair lists -> student-major tables ---------------------------------------------------
def _device_check(ok: torch.Tensor, msg: str):
    """Raise ValueError(msg) unless ``ok``; on CUDA an asynchronous device assert (no sync)."""
    if ok.is_cuda:
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(msg)


def pairs_to_table(student_R: torch.Tensor, teacher_R: torch.Tensor, weight_R: torch.Tensor,
                   M: int, P: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``R`` pairs (student row, teacher row, weight) -> ``(partner_MP, weight_MP)`` for
    ``soft_ce``: the pairs of student row i fill row i in their given order; free slots get
    partner 0 and weight 0 (no pair).

    ``P`` (most pairs of one student row): without it, it is counted (one host sync). With it,
    nothing leaves the device; a student row with more than ``P`` pairs, or a student index
    outside ``[0, M)``, is an error (``ValueError`` on the CPU, an asynchronous device assert on
    CUDA) -- never silently dropped.
    """
    for name, x in (("student_R", student_R), ("teacher_R", teacher_R)):
        if not torch.is_tensor(x) or x.dim() != 1 or x.dtype.is_floating_point \
                or x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
    _check_float("weight_R", weight_R, 1)
    R = student_R.numel()
    if teacher_R.numel() != R or weight_R.numel() != R:
        raise ValueError(f"student_R, teacher_R and weight_R must have the same length, got "
                         f"{R}, {teacher_R.numel()}, {weight_R.numel()}")
    for name, x in (("teacher_R", teacher_R), ("weight_R", weight_R)):
        if x.device != student_R.device:
            raise ValueError(f"{name} is on {x.device}, student_R on {student_R.device}")
    M = int(M)
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    dev = student_R.device
    s_R = student_R.long()
    if R:
        _device_check(((s_R >= 0) & (s_R < M)).all(), f"student_R has indices outside [0, M={M})")
    count_M = torch.zeros(M, dtype=torch.int64, device=dev).index_add_(
        0, s_R.clamp(0, M - 1), torch.ones_like(s_R))
    if P is None:
        P = max(1, int(count_M.max()))  # the one host sync, only when P is not given
    P = int(P)
    if P < 1:
        raise ValueError(f"P must be >= 1, got {P}")
    if R:
        _device_check((count_M <= P).all(), f"a student row has more than P={P} pairs")
    s_sorted, order = torch.sort(s_R, stable=True)  # stable: pairs keep their order in a row
    first_M = torch.cumsum(count_M, 0) - count_M
    rank_R = torch.arange(R, device=dev) - first_M[s_sorted.clamp(0, M - 1)]
    # pairs past P (already an error above) go to one extra slot that is cut off
    slot_R = torch.where(rank_R < P, s_sorted * P + rank_R, M * P)
    partner = torch.zeros(M * P + 1, dtype=torch.int64, device=dev)
    weight = torch.zeros(M * P + 1, dtype=weight_R.dtype, device=dev)
    partner.scatter_(0, slot_R, teacher_R.long()[order])
    weight.scatter_(0, slot_R, weight_R[order])
    return partner[:-1].view(M, P), weight[:-1].view(M, P)
