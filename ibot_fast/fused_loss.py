r"""``soft_ce``: weighted, centred, temperature-scaled soft-target cross-entropy over row pairs.

The one op behind both iBOT losses ([CLS] pairs across views, masked patch rows within a view),
with the gradient computed in the forward pass and no ``[rows, K]`` probability tensor kept::

    loss = sum_i sum_p w[i,p] * sum_k -softmax((t[j] - c)/tau_t)_k * log_softmax(s[i]/tau_s)_k,
           j = partner[i, p]
    d loss / d s[i] = sum_p w[i,p] (softmax(s[i]/tau_s) - softmax((t[j] - c)/tau_t)) / tau_s

Pairs are given student-major: ``partner_MP[i, p]`` is the teacher row of the p-th pair of
student row i and ``weight_MP[i, p]`` its weight; a weight of 0 means "no pair" (the partner
index must still be a valid row; 0 will do). A student row in several pairs gets one summed
gradient, computed by one program (no atomics, deterministic). Index maps and weights are
device tensors; the Triton path never synchronises with the host.

Back ends (``backend=``):

* ``"triton"`` -- ``ibot_fast.kernels.soft_ce_triton`` (CUDA; on the CPU only under
  ``TRITON_INTERPRET=1``, fp32, for tests). fp32 math inside for fp32/fp16/bf16 inputs.
* ``"torch"`` -- chunked PyTorch: only rows with a live pair are computed, ``chunk_rows`` at a
  time, so extra memory is the gradient plus a few ``[chunk_rows, K]`` temporaries. fp32 math
  for fp32/fp16/bf16 inputs, fp64 for fp64 inputs. Selecting the live rows is a ``nonzero``
  (a host sync on CUDA): this back end is the CPU path and the reference, not the GPU hot path.
* ``"auto"`` -- ``"triton"`` for CUDA tensors when triton imports (and no fp64), else ``"torch"``.

``soft_ce_linear`` is the fused-linear variant: it takes the L2-normalised bottleneck vectors
``z`` and the weight-normed last-layer weights ``W`` (logits ``z W^T``) and returns the same
loss, with gradients for ``z_s`` and ``W_s``; the logits are never materialised beyond a tile
(Triton) or a chunk (torch). The teacher's inputs never receive gradients.

The centre statistic is a column sum of the teacher logits: ``teacher_col_sum`` (one
bandwidth-bound ``torch.sum`` with fp32 accumulation, no upcast copy; for the linear variant
``(sum_rows z_t) W_t^T`` by linearity).

Sinkhorn-Knopp centring (DINOv2/v3's ``sinkhorn_knopp_teacher``) is a centre too:
``sinkhorn_knopp_center`` returns the vector ``c`` for which ``softmax((t - c)/tau_t)`` *is* the
Sinkhorn-Knopp target, so ``soft_ce`` fuses it like the EMA centre (derivation in its docstring).
``pairs_to_table`` turns a flat pair list into the student-major tables.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum", "sinkhorn_knopp_center",
           "pairs_to_table", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- back-end choice -----------------------------------------------------------------------
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` or ``"torch"``; validates explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    fp64 = any(t.dtype == torch.float64 for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and not fp64 and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' but triton is not installed; use backend='torch'")
        if fp64:
            raise ValueError("backend='triton' computes in fp32; fp64 inputs need "
                             "backend='torch'")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                             "before triton is imported, for CPU tests); use backend='torch'")
    return backend


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def teacher_col_sum(teacher_TK: torch.Tensor) -> torch.Tensor:
    """Column sums of the teacher logits, fp32 (fp64 for fp64 input), for the centre update."""
    return torch.sum(teacher_TK.detach(), dim=0, dtype=_compute_dtype(teacher_TK))


# ---- checks (metadata only unless check_finite) --------------------------------------------
def _check_float(name: str, x: torch.Tensor, dims: int):
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be fp16/bf16/fp32/fp64, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")


def _check_pairs(partner_MP, weight_MP, M: int, device):
    if not torch.is_tensor(partner_MP) or partner_MP.dtype != torch.int64:
        raise ValueError(f"partner_MP must be an int64 tensor, got "
                         f"{getattr(partner_MP, 'dtype', type(partner_MP).__name__)}")
    if partner_MP.dim() != 2 or partner_MP.shape[0] != M or partner_MP.shape[1] < 1:
        raise ValueError(f"partner_MP must be [M={M}, P>=1] (teacher row of each pair), got "
                         f"{tuple(partner_MP.shape)}")
    _check_float("weight_MP", weight_MP, 2)
    if tuple(weight_MP.shape) != tuple(partner_MP.shape):
        raise ValueError(f"weight_MP {tuple(weight_MP.shape)} must match partner_MP "
                         f"{tuple(partner_MP.shape)}")
    for name, t in (("partner_MP", partner_MP), ("weight_MP", weight_MP)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the logits on {device}")


def _check_temps(student_temp, teacher_temp):
    for name, v in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if torch.is_tensor(v):  # a 0-dim tensor: checked by whoever made it (no host sync)
            if v.numel() != 1 or not v.dtype.is_floating_point:
                raise ValueError(f"{name} must be a float or a 1-element float tensor, got "
                                 f"{v.dtype} {tuple(v.shape)}")
        elif not float(v) > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def _temp(v):
    """A temperature as the ops take it: a Python float, or a 0-dim tensor left as it is (the
    whole-step compile passes the per-epoch teacher temperature as a graph input, so a new
    epoch does not recompile the step)."""
    return v.reshape(()) if torch.is_tensor(v) else float(v)


def _check_center(center_K, K: int, device):
    if not torch.is_tensor(center_K) or center_K.dtype not in _FLOATS:
        raise ValueError("center_K must be a floating tensor")
    if center_K.numel() != K:
        raise ValueError(f"center_K has {center_K.numel()} elements {tuple(center_K.shape)}, "
                         f"the logits have K={K}")
    if center_K.device != device:
        raise ValueError(f"center_K is on {center_K.device}, the logits on {device}")


def _check_finite(name: str, x: torch.Tensor):
    if not bool(torch.isfinite(x).all()):  # a host sync: only with check_finite=True
        raise ValueError(f"{name} contains NaN or Inf")


def _check_core(student_MK, teacher_TK, partner_MP, weight_MP, center_K, student_temp,
                teacher_temp, check_finite):
    _check_float("student_MK", student_MK, 2)
    _check_float("teacher_TK", teacher_TK, 2)
    M, K = student_MK.shape
    if teacher_TK.shape[1] != K:
        raise ValueError(f"teacher_TK has K={teacher_TK.shape[1]}, student_MK has K={K}")
    if teacher_TK.device != student_MK.device:
        raise ValueError(f"teacher_TK is on {teacher_TK.device}, student_MK on "
                         f"{student_MK.device}")
    if teacher_TK.shape[0] == 0 and M > 0:
        raise ValueError("teacher_TK has no rows")
    _check_pairs(partner_MP, weight_MP, M, student_MK.device)
    _check_center(center_K, K, student_MK.device)
    _check_temps(student_temp, teacher_temp)
    if check_finite:
        _check_finite("teacher_TK", teacher_TK)
        _check_finite("center_K", center_K)
        _check_finite("weight_MP", weight_MP)


# ---- torch back end --------------------------------------------------------------------------
def _default_chunk_rows(K: int) -> int:
    # 512k elements (2 MB fp32) per temporary: big enough for vectorised loops, small
    # enough that the temporaries stay far below the gradient's size.
    return max(1, (1 << 19) // max(K, 1))


def _chunk_terms(s_CK, tt_CPK, w_CP, c_K, tau_s, tau_t, need_grad):
    """Loss sum and gradient of one chunk; s_CK/tt_CPK are fresh compute-dtype copies."""
    logp = torch.log_softmax(s_CK.div_(tau_s), dim=-1)
    del s_CK
    pt = torch.softmax(tt_CPK.sub_(c_K).div_(tau_t), dim=-1)
    q = torch.einsum("cp,cpk->ck", w_CP, pt)
    del pt
    loss = -torch.dot(q.reshape(-1), logp.reshape(-1))
    grad = None
    if need_grad:
        grad = logp.exp_().mul_(w_CP.sum(1, keepdim=True)).sub_(q).div_(tau_s)
    return loss, grad


def _soft_ce_torch(student_MK, teacher_TK, partner_MP, weight_MP, center_K, tau_s, tau_t,
                   need_grad, chunk_rows=None, grad_out=None):
    """``grad_out``: write the gradient there (``inplace_grad``: the student tensor itself).
    Safe because every chunk copies its student rows (``index_select``) before its gradient
    rows are written back, chunks are disjoint, and rows without a pair are zeroed last."""
    cdt = _compute_dtype(student_MK, teacher_TK, center_K)
    M, K = student_MK.shape
    P = partner_MP.shape[1]
    chunk = chunk_rows or _default_chunk_rows(K * P)
    live_MP = weight_MP != 0
    live_M = live_MP.any(dim=1)
    if grad_out is not None:
        grad = grad_out
    else:
        grad = torch.zeros_like(student_MK, memory_format=torch.contiguous_format) \
            if need_grad else None
    if torch.compiler.is_compiling():
        # inside a compiled step: every row (static shape, no sync; rows without a live pair
        # add exactly 0 to the loss and get a 0 gradient)
        rows = torch.arange(M, device=student_MK.device)
    else:
        rows = torch.nonzero(live_M).squeeze(1)  # the masked rows (host sync on CUDA)
    partner_MP = torch.where(live_MP, partner_MP, torch.zeros_like(partner_MP))
    c_K = center_K.reshape(-1).to(cdt)
    w_MP = weight_MP.to(cdt)
    total = torch.zeros((), dtype=cdt, device=student_MK.device)
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        # index_select returns fresh tensors (so the in-place maths below is safe); .to() is a
        # no-op for fp32/fp64 inputs and the upcast for half precision
        s = student_MK.index_select(0, r).to(cdt)
        tt = teacher_TK.index_select(0, partner_MP[r].reshape(-1)).to(cdt)
        loss, g = _chunk_terms(s, tt.view(r.numel(), P, K), w_MP[r], c_K, tau_s, tau_t,
                               need_grad)
        total += loss
        if need_grad:
            grad.index_copy_(0, r, g.to(grad.dtype))
    if grad_out is not None:
        grad.masked_fill_(~live_M[:, None], 0)  # after every read of the student rows
    return total, grad


def _soft_ce_linear_torch(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K,
                          tau_s, tau_t, need_grad, chunk_rows=None):
    cdt = _compute_dtype(zs_MD, ws_KD, zt_TD, wt_KD, center_K)
    M, D = zs_MD.shape
    K = ws_KD.shape[0]
    P = partner_MP.shape[1]
    chunk = chunk_rows or _default_chunk_rows(K * P)
    ws, wt = ws_KD.detach().to(cdt), wt_KD.detach().to(cdt)
    live_MP = weight_MP != 0
    partner_MP = torch.where(live_MP, partner_MP, torch.zeros_like(partner_MP))
    c_K = center_K.reshape(-1).to(cdt)
    w_MP = weight_MP.to(cdt)
    total = torch.zeros((), dtype=cdt, device=zs_MD.device)
    dzs = torch.zeros(M, D, dtype=cdt, device=zs_MD.device) if need_grad else None
    dws = torch.zeros(K, D, dtype=cdt, device=zs_MD.device) if need_grad else None
    for start in range(0, M, chunk):
        zs = zs_MD[start:start + chunk].detach().to(cdt)
        zt = zt_TD.detach().index_select(0, partner_MP[start:start + chunk].reshape(-1)).to(cdt)
        loss, g = _chunk_terms(zs @ ws.T, (zt @ wt.T).view(zs.shape[0], P, K),
                               w_MP[start:start + chunk], c_K, tau_s, tau_t, need_grad)
        total += loss
        if need_grad:
            dzs[start:start + chunk] = g @ ws
            dws.addmm_(g.T, zs)
    return total, dzs, dws


# ---- autograd ----------------------------------------------------------------------------------
class _SoftCE(torch.autograd.Function):
    """Forward computes the loss and d loss / d student; backward scales it by the incoming
    gradient in place (the stored gradient is used once: a second backward through the same
    graph is refused rather than silently wrong)."""

    @staticmethod
    def forward(ctx, student_MK, teacher_TK, partner_MP, weight_MP, center_K, student_temp,
                teacher_temp, backend, opts):
        need_grad = ctx.needs_input_grad[0]
        # inplace_grad: the gradient is written into the student's own storage. ``detach()``
        # shares storage *and* version counter, so the write bumps the student's version and
        # any op that saved the student tensor for its backward fails torch's usual in-place
        # check instead of reading the gradient as if it were logits. Without a gradient to
        # compute (no_grad, inputs not requiring grad) nothing is written.
        grad_out = student_MK.detach() if opts.get("inplace_grad") and need_grad else None
        if backend == "triton":
            from ibot_fast.kernels.soft_ce_triton import soft_ce_fwd
            # launch arguments: a tensor temperature is read back here (one sync)
            loss_M, grad = soft_ce_fwd(student_MK, teacher_TK, partner_MP, weight_MP, center_K,
                                       float(student_temp), float(teacher_temp),
                                       block_k=opts.get("block_k"), grad_out=grad_out)
            if grad_out is not None:  # a kernel's write is invisible to autograd: bump by hand
                torch.autograd.graph.increment_version(grad_out)
            loss = loss_M.sum()
        else:
            loss, grad = _soft_ce_torch(student_MK, teacher_TK, partner_MP, weight_MP,
                                        center_K, student_temp, teacher_temp, need_grad,
                                        opts.get("chunk_rows"), grad_out=grad_out)
        ctx.grad = grad if need_grad else None
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("soft_ce: backward ran twice through the same graph; the "
                               "gradient is computed in the forward pass and consumed once")
        ctx.used = True
        grad, ctx.grad = ctx.grad, None
        if grad is not None:
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


class _SoftCELinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K, student_temp,
                teacher_temp, backend, opts):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if backend == "triton":
            from ibot_fast.kernels.soft_ce_triton import soft_ce_linear_fwd
            loss_M, dzs, dws = soft_ce_linear_fwd(
                zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K,
                # launch arguments: a tensor temperature is read back here (one sync)
                1.0 / float(student_temp), 1.0 / float(teacher_temp),
                block_m=opts.get("block_m", 32),
                block_k=opts.get("block_k"))
            loss = loss_M.sum()
        else:
            loss, dzs, dws = _soft_ce_linear_torch(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP,
                                                   weight_MP, center_K, student_temp,
                                                   teacher_temp, need_grad,
                                                   opts.get("chunk_rows"))
        ctx.grads = (dzs, dws) if need_grad else (None, None)
        ctx.dtypes = (zs_MD.dtype, ws_KD.dtype)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("soft_ce_linear: backward ran twice through the same graph")
        ctx.used = True
        (dzs, dws), ctx.grads = ctx.grads, (None, None)
        out = []
        for g, dt, needed in zip((dzs, dws), ctx.dtypes, ctx.needs_input_grad[:2]):
            out.append(g.mul_(grad_loss.to(g.dtype)).to(dt) if needed and g is not None
                       else None)
        return (*out, None, None, None, None, None, None, None, None, None)


# ---- public ops --------------------------------------------------------------------------------
def soft_ce(student_MK: torch.Tensor, teacher_TK: torch.Tensor, partner_MP: torch.Tensor,
            weight_MP: torch.Tensor, center_K: torch.Tensor, student_temp: float,
            teacher_temp: float, *, backend: str = "auto", check_finite: bool = False,
            chunk_rows: Optional[int] = None, block_k: Optional[int] = None,
            inplace_grad: bool = False) -> torch.Tensor:
    """Weighted soft-target CE summed over all pairs (0-dim fp32; fp64 for fp64 inputs).

    student_MK: student logits [M, K] (gets the gradient, in its own dtype).
    teacher_TK: teacher logits [T, K] (detached).
    partner_MP: int64 [M, P], teacher row of each pair of student row i.
    weight_MP: [M, P] weights; 0 = no pair.
    center_K: the teacher centre, K elements (subtracted before dividing by teacher_temp).
    student_temp, teacher_temp: > 0; a 1-element tensor is taken as it is (not checked, no
        sync; the Triton back end reads it back): a compiled step passes the per-epoch
        teacher temperature that way so a new value is not a recompile.
    check_finite: raise ValueError on NaN/Inf in teacher_TK, center_K or weight_MP (syncs).
    chunk_rows (torch) / block_k (triton): tuning knobs; tests use small ones.
    inplace_grad: **the student logits tensor is overwritten by its gradient** during the
        forward pass (rows without a live pair get 0), and backward returns that storage
        (scaled in place by the incoming gradient), as Liger-Kernel's cross-entropy does: no
        second ``[M, K]`` buffer. Only safe when nothing else reads the student tensor after
        the loss -- true in iBOT, where the logits come from the head's last Linear, which
        saves its input and weight, not its output. Misuse is caught where it can be: a leaf
        that requires grad or a non-contiguous student raises ``ValueError`` (so does a
        teacher sharing the student's storage); the write bumps autograd's version counter, so
        an op that saved the student tensor for its backward raises torch's usual "modified by
        an inplace operation" error at backward. Reads that autograd does not track (plain
        Python code looking at the tensor after the loss) see the gradient: that is the
        contract. When no gradient is needed (``torch.no_grad()``, a student that does not
        require grad) nothing is written.
    """
    _check_core(student_MK, teacher_TK, partner_MP, weight_MP, center_K, student_temp,
                teacher_temp, check_finite)
    if inplace_grad:
        _check_inplace("student_MK", student_MK, teacher_TK)
    be = resolve_backend(backend, student_MK, teacher_TK, center_K)
    with torch.autocast(student_MK.device.type, enabled=False):
        return _SoftCE.apply(student_MK, teacher_TK.detach(), partner_MP, weight_MP,
                             center_K.detach(), _temp(student_temp), _temp(teacher_temp), be,
                             dict(chunk_rows=chunk_rows, block_k=block_k,
                                  # under no_grad needs_input_grad still reads requires_grad
                                  inplace_grad=bool(inplace_grad) and torch.is_grad_enabled()))


def _check_inplace(name: str, student: torch.Tensor, teacher: Optional[torch.Tensor] = None):
    """The preconditions of ``inplace_grad`` (metadata only, no sync)."""
    if student.is_leaf and student.requires_grad:
        raise ValueError(f"{name}: inplace_grad=True overwrites the student logits with their "
                         f"gradient, which is illegal on a leaf that requires grad; pass the "
                         f"output of the op producing the logits (e.g. the head's last Linear) "
                         f"or use inplace_grad=False")
    if not student.is_contiguous():
        raise ValueError(f"{name}: inplace_grad=True needs a contiguous tensor (the gradient is "
                         f"written into its storage row by row), got strides "
                         f"{tuple(student.stride())}; call .contiguous() or use "
                         f"inplace_grad=False")
    if teacher is not None and student.numel() and teacher.numel() and \
            student.untyped_storage().data_ptr() == teacher.untyped_storage().data_ptr():
        raise ValueError(f"{name}: inplace_grad=True but the teacher logits share the student's "
                         f"storage (they would be overwritten while read)")


def soft_ce_linear(zs_MD: torch.Tensor, ws_KD: torch.Tensor, zt_TD: torch.Tensor,
                   wt_KD: torch.Tensor, partner_MP: torch.Tensor, weight_MP: torch.Tensor,
                   center_K: torch.Tensor, student_temp: float, teacher_temp: float, *,
                   backend: str = "auto", check_finite: bool = False,
                   chunk_rows: Optional[int] = None, block_k: Optional[int] = None,
                   block_m: int = 32) -> torch.Tensor:
    """``soft_ce(zs_MD @ ws_KD.T, zt_TD @ wt_KD.T, ...)`` without materialising the logits.

    zs_MD: student bottleneck vectors (L2-normalised) [M, D]; gets a gradient.
    ws_KD: student last-layer weight (weight-normed) [K, D]; gets a gradient.
    zt_TD, wt_KD: the teacher's [T, D] and [K, D] (no gradients).
    Other arguments as in ``soft_ce``.
    """
    _check_float("zs_MD", zs_MD, 2)
    _check_float("ws_KD", ws_KD, 2)
    _check_float("zt_TD", zt_TD, 2)
    _check_float("wt_KD", wt_KD, 2)
    M, D = zs_MD.shape
    K = ws_KD.shape[0]
    for name, t, shape in (("ws_KD", ws_KD, (K, D)), ("wt_KD", wt_KD, (K, D))):
        if t.shape[1] != D or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be [K={K}, D={D}] (D of zs_MD), got {tuple(t.shape)}")
    if zt_TD.shape[1] != D:
        raise ValueError(f"zt_TD has D={zt_TD.shape[1]}, zs_MD has D={D}")
    for name, t in (("ws_KD", ws_KD), ("zt_TD", zt_TD), ("wt_KD", wt_KD)):
        if t.device != zs_MD.device:
            raise ValueError(f"{name} is on {t.device}, zs_MD on {zs_MD.device}")
    _check_pairs(partner_MP, weight_MP, M, zs_MD.device)
    _check_center(center_K, K, zs_MD.device)
    _check_temps(student_temp, teacher_temp)
    if check_finite:
        _check_finite("zt_TD", zt_TD)
        _check_finite("wt_KD", wt_KD)
        _check_finite("center_K", center_K)
    be = resolve_backend(backend, zs_MD, ws_KD, zt_TD, wt_KD, center_K)
    with torch.autocast(zs_MD.device.type, enabled=False):
        return _SoftCELinear.apply(zs_MD, ws_KD, zt_TD.detach(), wt_KD.detach(), partner_MP,
                                   weight_MP, center_K.detach(), _temp(student_temp),
                                   _temp(teacher_temp), be,
                                   dict(chunk_rows=chunk_rows, block_k=block_k,
                                        block_m=block_m))


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
