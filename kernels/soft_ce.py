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

* ``"triton"`` -- the kernels of ``soft_ce_triton`` in this package (CUDA; on the CPU only under
  ``TRITON_INTERPRET=1``, fp32, for tests). fp32 math inside for fp32/fp16/bf16 inputs.
  Temperatures reach the kernels as device scalars and the kernels are ``torch.library``
  ops (``triton_op``): a ``torch.compile``-d step traces them without a graph break or a
  host sync.
* ``"torch"`` -- chunked PyTorch: only rows with a live pair are computed, ``chunk_rows`` at a
  time, so extra memory is the gradient plus a few ``[chunk_rows, K]`` temporaries. fp32 math
  for fp32/fp16/bf16 inputs, fp64 for fp64 inputs. Selecting the live rows is a ``nonzero``
  (a host sync on CUDA): this back end is the CPU path and the reference, not the GPU hot path.
* ``"auto"`` -- ``"triton"`` for CUDA tensors when triton imports (and no fp64), else ``"torch"``.

``soft_ce_linear`` is the fused-linear variant: it takes the L2-normalised bottleneck vectors
``z`` and the weight-normed last-layer weights ``W`` (logits ``z W^T``) and returns the same
loss, with gradients for ``z_s`` and ``W_s``; the logits are never materialised beyond a tile
(Triton) or a chunk (torch). The teacher's inputs never receive gradients.
Its Triton back end needs bf16/fp16 inputs on CUDA (``linear_backend``).

The centre statistic is a column sum of the teacher logits: ``teacher_col_sum`` (one
bandwidth-bound ``torch.sum`` with fp32 accumulation, no upcast copy; for the linear variant
``(sum_rows z_t) W_t^T`` by linearity).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum", "resolve_backend", "linear_backend",
           "BACKENDS"]

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


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the dtype the op computes in for these inputs."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def teacher_col_sum(teacher_TK: torch.Tensor) -> torch.Tensor:
    """Column sums of the teacher logits, fp32 (fp64 for fp64 input), for the centre update."""
    return torch.sum(teacher_TK.detach(), dim=0, dtype=compute_dtype(teacher_TK))


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
    cdt = compute_dtype(student_MK, teacher_TK, center_K)
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
    cdt = compute_dtype(zs_MD, ws_KD, zt_TD, wt_KD, center_K)
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
            from .soft_ce_triton import soft_ce_fwd
            # temperatures go to the kernel as device scalars (no .item(), no graph break);
            # the in-place variant is an op that declares its mutation, so autograd's
            # version counter of the student is bumped by the dispatcher
            loss_M, grad = soft_ce_fwd(student_MK if grad_out is None else grad_out, teacher_TK,
                                       partner_MP, weight_MP, center_K, student_temp,
                                       teacher_temp, block_k=opts.get("block_k"),
                                       inplace=grad_out is not None)
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
        ctx.dtypes = (zs_MD.dtype, ws_KD.dtype)  # gradients go back in the inputs' own dtypes
        half = [t.dtype for t in (zs_MD, ws_KD, zt_TD, wt_KD)
                if t.dtype in (torch.float16, torch.bfloat16)]
        if half:  # one dtype for the four inputs, every back end (soft_ce_linear: Precision)
            zs_MD, ws_KD, zt_TD, wt_KD = (t.to(half[0]) for t in (zs_MD, ws_KD, zt_TD, wt_KD))
        if backend == "triton":
            from .soft_ce_triton import soft_ce_linear_fwd
            loss_M, dzs, dws = soft_ce_linear_fwd(
                zs_MD, ws_KD, zt_TD, wt_KD, partner_MP, weight_MP, center_K,
                student_temp, teacher_temp,  # device scalars for the kernels, never read back
                block_m=opts.get("block_m"), block_k=opts.get("block_k"))
            loss = loss_M.sum()
        else:
            loss, dzs, dws = _soft_ce_linear_torch(zs_MD, ws_KD, zt_TD, wt_KD, partner_MP,
                                                   weight_MP, center_K, student_temp,
                                                   teacher_temp, need_grad,
                                                   opts.get("chunk_rows"))
        ctx.grads = (dzs, dws) if need_grad else (None, None)
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
        sync; the Triton kernels load it from device memory): a compiled step passes the
        per-epoch teacher temperature that way so a new value is not a recompile.
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
        check_inplace_grad("student_MK", student_MK, teacher_TK)
    be = resolve_backend(backend, student_MK, teacher_TK, center_K)
    with torch.autocast(student_MK.device.type, enabled=False):
        return _SoftCE.apply(student_MK, teacher_TK.detach(), partner_MP, weight_MP,
                             center_K.detach(), _temp(student_temp), _temp(teacher_temp), be,
                             dict(chunk_rows=chunk_rows, block_k=block_k,
                                  # under no_grad needs_input_grad still reads requires_grad
                                  inplace_grad=bool(inplace_grad) and torch.is_grad_enabled()))


def check_inplace_grad(name: str, student: torch.Tensor,
                       teacher: Optional[torch.Tensor] = None):
    """The preconditions of ``inplace_grad`` on one student input, named as the caller knows it
    (metadata only, no sync); the loss modules call it under their own argument names."""
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
    # storage pointers cannot be traced by dynamo: checked in eager calls only
    if teacher is not None and student.numel() and teacher.numel() and \
            not torch.compiler.is_compiling() and \
            student.untyped_storage().data_ptr() == teacher.untyped_storage().data_ptr():
        raise ValueError(f"{name}: inplace_grad=True but the teacher logits share the student's "
                         f"storage (they would be overwritten while read)")


def linear_backend(requested: str, resolved: str, *inputs: torch.Tensor) -> str:
    """The back end of ``soft_ce_linear``: ``resolved`` (``resolve_backend``'s choice) unless
    it is a compiled Triton launch on fp32 inputs (none of the four is bf16/fp16). Its dots
    run in TF32 and exact fp32 products do not fit the H200's registers at D = 256
    (``soft_ce_triton.soft_ce_linear_config``), so ``"auto"`` takes the torch back end there
    (chunked fp32 matmuls) and an explicit ``"triton"`` is refused."""
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in inputs)
    if resolved != "triton" or half or not inputs[0].is_cuda:
        return resolved
    if requested == "auto":
        return "torch"
    raise ValueError("soft_ce_linear: backend='triton' runs its dots in TF32 and needs bf16/fp16 "
                     "inputs on CUDA (exact fp32 products spill registers at D = 256); got "
                     "fp32 z and W. Use backend='auto' or 'torch' (chunked fp32 matmuls), or "
                     "bf16 inputs (e.g. --precision bf16)")


def soft_ce_linear(zs_MD: torch.Tensor, ws_KD: torch.Tensor, zt_TD: torch.Tensor,
                   wt_KD: torch.Tensor, partner_MP: torch.Tensor, weight_MP: torch.Tensor,
                   center_K: torch.Tensor, student_temp: float, teacher_temp: float, *,
                   backend: str = "auto", check_finite: bool = False,
                   chunk_rows: Optional[int] = None, block_k: Optional[int] = None,
                   block_m: Optional[int] = None) -> torch.Tensor:
    """``soft_ce(zs_MD @ ws_KD.T, zt_TD @ wt_KD.T, ...)`` without materialising the logits.

    zs_MD: student bottleneck vectors (L2-normalised) [M, D]; gets a gradient.
    ws_KD: student last-layer weight (weight-normed) [K, D]; gets a gradient.
    zt_TD, wt_KD: the teacher's [T, D] and [K, D] (no gradients).
    block_m, block_k (triton): tile overrides for tests; by default
        ``soft_ce_triton.soft_ce_linear_config`` picks the tiles per shape (they fit the
        H200's shared memory at D = 256).
    Precision: when any of the four inputs is bf16/fp16, all four are taken in that dtype
        (an fp32 weight meets bf16 ``z`` in bf16, as ``F.linear`` under autocast computes the
        reference's logits), on every back end; the maths from there is fp32 (exact products,
        fp32 accumulation); gradients are fp32 until cast to each input's own dtype. fp32
        inputs on CUDA take the torch back end under ``"auto"`` and are refused by
        ``"triton"`` (``linear_backend``): the Triton kernels' dots are TF32.
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
    be = linear_backend(backend, resolve_backend(backend, zs_MD, ws_KD, zt_TD, wt_KD, center_K),
                        zs_MD, ws_KD, zt_TD, wt_KD)
    with torch.autocast(zs_MD.device.type, enabled=False):
        return _SoftCELinear.apply(zs_MD, ws_KD, zt_TD.detach(), wt_KD.detach(), partner_MP,
                                   weight_MP, center_K.detach(), _temp(student_temp),
                                   _temp(teacher_temp), be,
                                   dict(chunk_rows=chunk_rows, block_k=block_k,
                                        block_m=block_m))

