r"""The iBOT loss: a drop-in for the reference ``iBOTLoss`` (bytedance/ibot ``main_ibot.py``).

Same constructor, same ``forward`` signature, same returned dict and the same state-dict keys
(``center``, ``center2``). Two classes:

* ``IBOTLossReference`` -- the eager dense path (every patch token, like the reference): the
  ground truth every fast path is tested against.
* ``IBOTLoss`` -- the same module on the fused op ``ibot_fast.fused_loss.soft_ce``
  (``backend="auto"|"triton"|"torch"``, or ``"eager"`` for the reference path): patch terms on
  masked rows only, no probability tensor kept, gradient computed in the forward pass; the
  centre still averages all teacher tokens. ``IBOTLoss.forward_selected`` is the entry point for
  inputs already gathered (the fast trainer path).

The semantics are those of ``reference-semantics.md`` section 2, restated here.

Notation
--------
``ng`` global crops, ``nl`` local crops, ``nc = ng + nl``; per-rank batch ``B``; ``N`` patch
tokens per global crop; ``K`` [CLS] and ``K2`` patch output dims. Every concatenated input is
*crop-major* (all B images of crop 0, then crop 1, ...), as ``MultiCropWrapper`` produces it.
``tau_s`` is the student temperature (0.1); ``tau``/``tau2`` are the teacher [CLS]/patch
temperatures of the current epoch (per-epoch schedules, see ``schedules.teacher_temp_schedule``);
``c``/``c2`` are the centres from the *previous* step.

Targets and predictions
-----------------------
::

    P_q[b]    = softmax((t_cls_q[b]    - c ) / tau )     q < ng          (teacher, no grad)
    T_q[b,n]  = softmax((t_patch_q[b,n] - c2) / tau2)    q < ng, all N tokens
    L_v[b]    = log_softmax(s_cls_v[b]    / tau_s)        v < nc  (globals then locals)
    S_v[b,n]  = log_softmax(s_patch_v[b,n] / tau_s)       v < ng

The centre is subtracted *before* dividing by the temperature.

[CLS] term -- every (teacher global q, student crop v) pair with v != q, equally weighted::

    loss_cls = lambda1 / (ng*nc - ng) * sum_{q<ng} sum_{v<nc, v!=q} mean_b( -sum_k P_q[b,k] L_v[b,k] )

Patch (MIM) term -- same view only (student masked view q vs teacher unmasked view q);
``m_q[b,n]`` is ``student_mask[q]`` flattened to ``[B, N]``::

    l_q[b,n]   = -sum_k T_q[b,n,k] S_q[b,n,k]
    img_q[b]   = sum_n m_q[b,n] l_q[b,n] / max(sum_n m_q[b,n], 1)
    loss_patch = lambda2 / ng * sum_{q<ng} mean_b img_q[b]

The mean over b runs over *all* B images: an image without masked tokens adds exactly 0 but
still counts. It is not a mean over all masked tokens of the batch.

Returned: ``{'cls': loss_cls, 'patch': loss_patch, 'loss': loss_cls + loss_patch}`` (0-dim).

Centre update (after the loss, inside ``forward``; no grad)
-----------------------------------------------------------
With ``R = ng*B`` rows per rank and ``W`` ranks (``W = 1`` without an initialised process
group), sums all-reduced across ranks::

    c  <- m  c  + (1 - m ) * sum_ranks sum_rows t_cls                 / (R W)
    c2 <- m2 c2 + (1 - m2) * sum_ranks sum_rows mean_n t_patch[., n]   / (R W)

``c2`` averages over *all* N teacher patch tokens, masked or not; raw logits, no temperature.

Sinkhorn-Knopp centring (``center="sinkhorn_knopp"``, an option; not in the reference)
---------------------------------------------------------------------------------------
As DINOv2/v3 (``sinkhorn_knopp_teacher``, 3 iterations by default): ``P_q`` comes from
Sinkhorn-Knopp over the teacher [CLS] rows of all global crops (and ranks), ``T_q`` over the
teacher rows of the *masked* tokens only (DINOv2's masked-token variant). No EMA centre is
involved: ``center``/``center2`` stay in the state dict but are neither used nor updated.

Gradients
---------
Only the student receives gradients: ``d loss_cls / d s_cls_v = (1/tau_s) * lambda1/(n1 B) *
sum_{q != v} (softmax(s_cls_v/tau_s) - P_q)`` and, for a masked token,
``d loss_patch / d s_patch_q[b,n] = (1/tau_s) * lambda2/(ng B max(count_b,1)) *
(softmax(s_patch_q[b,n]/tau_s) - T_q[b,n])``; unmasked tokens get exactly 0.

Precision
---------
Logits are upcast to fp32 (fp64 stays fp64) before any softmax/log_softmax. The reference gets
fp32 log-probabilities from autocast (``log_softmax`` is on its fp32 list, and fp16 teacher
logits minus the fp32 centre promote to fp32); the teacher temperature 0.04 amplifies any
rounding of half-precision logits 25x. One small difference under fp16/bf16: the reference
divides the student logits by ``tau_s`` in half precision before the upcast; we divide in fp32.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ibot_fast.fused_loss import (_check_inplace, _compute_dtype, sinkhorn_knopp_center,
                                  soft_ce, soft_ce_linear, teacher_col_sum)
from ibot_fast.masking import patch_token_weights
from ibot_fast.schedules import teacher_temp_schedule

__all__ = ["IBOTLoss", "IBOTLossReference", "LOSS_BACKENDS", "CENTERINGS", "masked_patch_rows",
           "sinkhorn_knopp_targets"]

LOSS_BACKENDS = ("auto", "triton", "torch", "eager")
CENTERINGS = ("ema", "sinkhorn_knopp")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def sinkhorn_knopp_targets(teacher_TK: torch.Tensor, teacher_temp: float,
                           n_iterations: int = 3) -> torch.Tensor:
    """DINOv2/v3's Sinkhorn-Knopp teacher targets, dense: ``[T, K]`` rows summing to 1 (fp32;
    fp64 for fp64 input).

    Every row of ``teacher_TK`` is a sample (select the masked rows first for the patch term).
    The plain algorithm -- ``Q = exp(t/tau)^T``, then ``n_iterations`` of prototype-row and
    sample-column normalisation with sums all-reduced over ranks -- kept as the eager ground
    truth of the fused centring (``fused_loss.sinkhorn_knopp_center``). Two deviations, both for
    range: ``t/tau`` is shifted by its global maximum before ``exp`` (a constant factor on
    ``Q``, which the normalisations cancel), so logits beyond 88 tau do not overflow as they do
    in DINOv2; and the iterations run in fp64, where ``exp`` of the shifted logits underflows
    only beyond a span of ~700 (fp32: ~87, which cold teachers reach; a prototype row of zeros
    would then divide 0 by 0).
    """
    out_dtype = _upcast(teacher_TK).dtype
    x = teacher_TK.detach().double() / teacher_temp
    distributed = _dist_world_size() > 1
    shift = x.max() if x.numel() else x.new_tensor(float("-inf"))
    n_samples = x.new_tensor(float(x.shape[0]))
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        dist.all_reduce(n_samples)
    Q = torch.exp(x - shift).t()  # [K, T]: prototypes x samples, as in DINOv2
    K = Q.shape[0]
    total = Q.sum()
    if distributed:
        dist.all_reduce(total)
    Q = Q / total
    for _ in range(n_iterations):
        per_prototype = Q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        Q = Q / per_prototype / K
        Q = Q / Q.sum(dim=0, keepdim=True) / n_samples
    return (Q * n_samples).t().to(out_dtype)


class IBOTLossReference(nn.Module):
    """iBOT [CLS] self-distillation + masked-patch (MIM) loss with teacher centring, eager and
    dense (the ground truth of the fused ``IBOTLoss``).

    See the module docstring for the maths. Positional arguments follow the reference:
    ``out_dim, patch_out_dim, ngcrops, nlcrops, warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs``.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, ngcrops: int, nlcrops: int,
                 warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp2: float, teacher_temp2: float,
                 warmup_teacher_temp_epochs: int, nepochs: int,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_momentum2: float = 0.9, lambda1: float = 1.0, lambda2: float = 1.0,
                 mim_start_epoch: int = 0, *, center: str = "ema",
                 sinkhorn_iterations: int = 3):
        super().__init__()
        if center not in CENTERINGS:
            raise ValueError(f"IBOTLoss: center must be one of {CENTERINGS}, got {center!r}")
        if isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int) \
                or sinkhorn_iterations < 1:
            raise ValueError(f"IBOTLoss: sinkhorn_iterations must be an int >= 1, got "
                             f"{sinkhorn_iterations!r}")
        # ``center`` names the buffer (reference state dict), so the option lives here
        self.center_mode = center
        self.sinkhorn_iterations = sinkhorn_iterations
        if ngcrops < 1:
            raise ValueError(f"IBOTLoss: ngcrops must be >= 1 (got {ngcrops})")
        if nlcrops < 0:
            raise ValueError(f"IBOTLoss: nlcrops must be >= 0 (got {nlcrops})")
        if ngcrops + nlcrops < 2:
            # The [CLS] term needs at least one pair v != q; the reference divides by zero here.
            raise ValueError(f"IBOTLoss: the [CLS] loss needs at least 2 crops in total "
                             f"(got ngcrops={ngcrops}, nlcrops={nlcrops})")
        self.out_dim = out_dim
        self.patch_out_dim = patch_out_dim
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.ncrops = ngcrops + nlcrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.mim_start_epoch = mim_start_epoch
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        # Per-epoch float64 arrays, as in the reference (a too-cold teacher early on is unstable).
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp2_schedule = teacher_temp_schedule(
            warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs,
            start_epoch=mim_start_epoch)

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, patch_out_dim={self.patch_out_dim}, "
                f"ngcrops={self.ngcrops}, nlcrops={self.nlcrops}, "
                f"student_temp={self.student_temp}, lambda1={self.lambda1}, "
                f"lambda2={self.lambda2}, mim_start_epoch={self.mim_start_epoch}, "
                f"center={self.center_mode!r}")

    def temperatures(self, epoch: int) -> tuple[float, float]:
        """Teacher temperatures ``(tau_cls, tau_patch)`` used at `epoch`."""
        epoch = operator.index(epoch)
        nepochs = len(self.teacher_temp_schedule)
        if not 0 <= epoch < nepochs:
            raise IndexError(f"IBOTLoss: epoch {epoch} is outside the teacher temperature "
                             f"schedule, which covers epochs 0..{nepochs - 1} (nepochs={nepochs})")
        return float(self.teacher_temp_schedule[epoch]), float(self.teacher_temp2_schedule[epoch])

    # ------------------------------------------------------------------------------------------
    def forward(self, student_output, teacher_output, student_local_cls: Optional[torch.Tensor],
                student_mask: Sequence[torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """Loss of one step, then the centre update.

        student_output: ``(cls [ng*B, K], patch [ng*B, N, K2])`` of the masked global crops.
        teacher_output: the same shapes, of the unmasked global crops (never gets gradients).
        student_local_cls: ``[nl*B, K]`` or None (only when ``nlcrops == 0``).
        student_mask: masks of all crops, each ``[B, h, w]`` or ``[B, N]`` (bool or 0/1);
            only the first ``ngcrops`` are read.
        epoch: index into the per-epoch temperature schedules.
        """
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
        B, N = self._check_inputs(student_cls, student_patch, teacher_cls, teacher_patch,
                                  student_local_cls, student_mask)
        tau, tau2 = self.temperatures(epoch)
        ng, nc = self.ngcrops, self.ncrops

        # ---- [CLS]: every pair (teacher global q, student crop v != q) ----------------------
        if self.nlcrops > 0:
            student_cls = torch.cat([student_cls, student_local_cls])
        # log_softmax once per student crop (the reference recomputes it for every q).
        logp_cls_VBK = F.log_softmax(_upcast(student_cls) / self.student_temp, dim=-1)
        logp_cls_VBK = logp_cls_VBK.view(nc, B, self.out_dim)
        sk = self.center_mode == "sinkhorn_knopp"
        if sk:
            p_cls_QBK = sinkhorn_knopp_targets(teacher_cls, tau, self.sinkhorn_iterations)
        else:
            p_cls_QBK = F.softmax((_upcast(teacher_cls) - self.center) / tau, dim=-1)
        p_cls_QBK = p_cls_QBK.view(ng, B, self.out_dim)
        total_cls = logp_cls_VBK.new_zeros(())
        for q in range(ng):
            # ce_V[v] = mean_b(-sum_k P_q log p_v), for all student crops v at once.
            ce_V = -(p_cls_QBK[q] * logp_cls_VBK).sum(dim=-1).mean(dim=-1)
            total_cls = total_cls + ce_V[:q].sum() + ce_V[q + 1:].sum()
        loss_cls = total_cls / (ng * nc - ng) * self.lambda1

        # ---- patch (MIM): same view only, per-image mean over masked tokens ---------------
        # Dense over all N tokens, like the reference: unmasked tokens are weighted by 0, so
        # their gradient is exactly 0. (The fused kernel evaluates masked rows only.)
        logp_patch = F.log_softmax(_upcast(student_patch) / self.student_temp, dim=-1)
        mask_QBN = torch.stack([student_mask[q].reshape(B, N) for q in range(ng)])
        mask_QBN = mask_QBN.to(device=logp_patch.device, dtype=logp_patch.dtype)
        if sk:  # Sinkhorn-Knopp over the masked teacher rows only; other rows are masked out
            rows_T = mask_QBN.reshape(-1).bool()
            t_patch = logp_patch.new_zeros(ng * B * N, self.patch_out_dim)
            t_patch[rows_T] = sinkhorn_knopp_targets(
                teacher_patch.reshape(-1, self.patch_out_dim)[rows_T], tau2,
                self.sinkhorn_iterations).to(t_patch.dtype)
            t_patch = t_patch.view_as(logp_patch)
        else:
            t_patch = F.softmax((_upcast(teacher_patch) - self.center2) / tau2, dim=-1)
        ce_QBN = -(t_patch * logp_patch).sum(dim=-1).view(ng, B, N)
        img_QB = (ce_QBN * mask_QBN).sum(dim=-1) / mask_QBN.sum(dim=-1).clamp(min=1.0)
        loss_patch = img_QB.mean(dim=-1).sum() / ng * self.lambda2

        # The loss above used the previous step's centres; now update them.
        if not sk:
            self.update_center(teacher_cls, teacher_patch)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the global mean of the raw teacher logits (all rows of all ranks).

        Like the reference, every rank must hold the same number of rows (the all-reduced sum
        is divided by ``rows * world_size``). Without an initialised process group the world
        size is 1 and no collective is issued.
        """
        rows = teacher_cls.shape[0]
        cls_sum_K = _upcast(teacher_cls).sum(dim=0)
        # Mean over all N tokens of each image (masked or not), summed over images.
        patch_sum_K2 = _upcast(teacher_patch).mean(dim=1).sum(dim=0)
        self._update_center_from_sums(cls_sum_K, patch_sum_K2, rows)

    @torch.no_grad()
    def _update_center_from_sums(self, cls_sum_K: torch.Tensor, patch_sum_K2: torch.Tensor,
                                 rows: int) -> None:
        """EMA step from this rank's sums: ``cls_sum_K`` = sum of the teacher [CLS] logits over
        its ``rows`` global-crop rows, ``patch_sum_K2`` = sum over those rows of each row's mean
        over all N patch tokens. All-reduced when a process group is initialised."""
        world_size = _dist_world_size()
        if world_size > 1:
            # One collective for both sums (elementwise, so identical to two all-reduces).
            flat = torch.cat([cls_sum_K, patch_sum_K2.to(cls_sum_K.dtype)])
            dist.all_reduce(flat)
            cls_sum_K, patch_sum_K2 = flat.split([self.out_dim, self.patch_out_dim])
        cls_center = cls_sum_K / (rows * world_size)
        patch_center = patch_sum_K2 / (rows * world_size)
        m, m2 = self.center_momentum, self.center_momentum2
        self.center.copy_(self.center * m + cls_center * (1 - m))
        self.center2.copy_(self.center2 * m2 + patch_center * (1 - m2))

    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, student_cls, student_patch, teacher_cls, teacher_patch,
                      student_local_cls, student_mask) -> tuple[int, int]:
        """Shape checks (metadata only, no device syncs). Returns ``(B, N)``."""
        ng, nl, K, K2 = self.ngcrops, self.nlcrops, self.out_dim, self.patch_out_dim
        where = "IBOTLoss.forward"
        if student_cls.dim() != 2 or student_cls.shape[-1] != K:
            raise ValueError(f"{where}: student [CLS] logits must be [ngcrops*B, out_dim={K}], "
                             f"got {tuple(student_cls.shape)}")
        rows = student_cls.shape[0]
        if rows == 0 or rows % ng:
            raise ValueError(f"{where}: student [CLS] logits have {rows} rows, not a positive "
                             f"multiple of ngcrops={ng} (inputs are crop-major: ngcrops*B rows)")
        B = rows // ng
        if tuple(teacher_cls.shape) != tuple(student_cls.shape):
            raise ValueError(f"{where}: teacher [CLS] logits {tuple(teacher_cls.shape)} do not "
                             f"match the student's {tuple(student_cls.shape)}")
        if student_patch.dim() != 3 or student_patch.shape[0] != rows or student_patch.shape[-1] != K2:
            raise ValueError(f"{where}: student patch logits must be [ngcrops*B={rows}, N, "
                             f"patch_out_dim={K2}], got {tuple(student_patch.shape)}")
        if tuple(teacher_patch.shape) != tuple(student_patch.shape):
            raise ValueError(f"{where}: teacher patch logits {tuple(teacher_patch.shape)} do not "
                             f"match the student's {tuple(student_patch.shape)}")
        N = student_patch.shape[1]
        if nl > 0:
            if student_local_cls is None:
                raise ValueError(f"{where}: nlcrops={nl} but student_local_cls is None; pass the "
                                 f"local crops' [CLS] logits [nlcrops*B, out_dim]")
            if tuple(student_local_cls.shape) != (nl * B, K):
                raise ValueError(f"{where}: student_local_cls must be [nlcrops*B, out_dim] = "
                                 f"{(nl * B, K)}, got {tuple(student_local_cls.shape)}")
        elif student_local_cls is not None and student_local_cls.numel() > 0:
            raise ValueError(f"{where}: nlcrops=0 but student_local_cls has shape "
                             f"{tuple(student_local_cls.shape)}; pass None or build the loss "
                             f"with nlcrops > 0")
        if len(student_mask) < ng:
            raise ValueError(f"{where}: student_mask has {len(student_mask)} mask(s), need at "
                             f"least ngcrops={ng} (one per global crop, crop order)")
        for q in range(ng):
            m = student_mask[q]
            if m.dim() < 2 or m.shape[0] != B or m[0].numel() != N:
                raise ValueError(f"{where}: student_mask[{q}] has shape {tuple(m.shape)}; "
                                 f"expected [B={B}, h, w] with h*w = N = {N} patch tokens "
                                 f"(or [B, N])")
        return B, N


# ---------------------------------------------------------------------------------------------
# The fused loss
# ---------------------------------------------------------------------------------------------
def masked_patch_rows(student_mask: Sequence[torch.Tensor], ngcrops: int,
                      max_rows: Optional[int] = None, device=None):
    """The masked patch tokens of the global crops, as rows of the crop-major token axis.

    Returns ``(row_idx_M, weight_M)``: ``row_idx_M`` (int64) indexes the flattened
    ``[ngcrops*B*N]`` token axis (row ``(q*B + b)*N + n``, the layout of
    ``student_patch.reshape(-1, K2)``), ``weight_M`` (fp32) is ``1 / (ngcrops * B *
    max(count_b, 1))`` for a masked token of image b. These are the reference's per-image mean
    over masked tokens, then the mean over all B images (an image with no masked token counts
    as 0), then the mean over the global crops -- the weights ``forward_selected`` expects.

    Without ``max_rows`` the rows are found with ``nonzero`` (a host sync on CUDA). With
    ``max_rows`` (a static upper bound the caller guarantees, e.g. ``ngcrops * B *
    MaskGenerator.max_masked(h, w)``) there is no sync: masked rows come first in token order,
    padded with unmasked rows of weight 0; masked rows beyond ``max_rows`` would be dropped.
    """
    B = student_mask[0].shape[0]
    N = student_mask[0][0].numel()
    mask_QBN = torch.stack([student_mask[q].reshape(B, N) for q in range(ngcrops)])
    mask_QBN = mask_QBN.to(device=device or mask_QBN.device, dtype=torch.bool)
    weight_T = patch_token_weights(mask_QBN)  # the same weights MaskBatch carries
    mask_T = mask_QBN.reshape(-1)
    if max_rows is None:
        row_idx = torch.nonzero(mask_T).squeeze(1)
    else:
        order = torch.sort((~mask_T).to(torch.uint8), stable=True).indices
        row_idx = order[:min(int(max_rows), mask_T.numel())]
    return row_idx, weight_T.index_select(0, row_idx)


class IBOTLoss(IBOTLossReference):
    """The iBOT loss on the fused op: a drop-in for the reference ``iBOTLoss``.

    Constructor, ``forward``, returned dict and state dict as ``IBOTLossReference`` (the
    reference's), plus keyword-only options:

    backend: ``"auto"`` (Triton on CUDA, chunked torch otherwise), ``"triton"``, ``"torch"``,
        or ``"eager"`` (the dense reference path, ``IBOTLossReference.forward``).
    check_finite: raise ``ValueError`` when the teacher logits hold NaN/Inf (one host sync).
    inplace_grad: opt-in, ``forward`` (the dense drop-in) only, fused back ends only. **The
        student logits tensors are overwritten by their gradients** in the forward pass
        (``student_output[1]`` whole, unmasked tokens set to 0; ``student_output[0]`` too when
        ``nlcrops == 0``, else the [CLS] gradient goes into the loss's own concatenation), as
        in Liger-Kernel's cross-entropy: no second ``[ngcrops*B, N, K2]`` buffer. Only safe
        when nothing reads the student logits after the loss -- true in iBOT, where they come
        from the head's last Linear, which saves its input and weight but not its output. The
        student logits must not be leaves that require grad and must be contiguous
        (``ValueError`` otherwise); an autograd op that saved them raises torch's "modified by
        an inplace operation" error at backward (see ``fused_loss.soft_ce``).
    center (also ``IBOTLossReference``): ``"ema"`` (the reference's EMA centres) or
        ``"sinkhorn_knopp"`` (DINOv2/v3; ``sinkhorn_iterations=3``): the Sinkhorn-Knopp target
        is ``softmax((t - c)/tau)`` for a per-batch vector ``c``
        (``fused_loss.sinkhorn_knopp_center``), so it runs through the same fused op.

    ``forward`` computes the patch term on masked tokens only (unmasked tokens get an exact
    zero gradient, as in the reference) while the centre ``center2`` still averages all teacher
    patch tokens. Each patch row is weighted by ``lambda2 / (ngcrops * B * max(count_b, 1))``
    (count_b = masked tokens of its image): the reference's per-image mean averaged over all B
    images, images without masked tokens counting as zero. [CLS] pairs (teacher global crop q,
    student crop v != q) weigh ``lambda1 / ((ngcrops * ncrops - ngcrops) * B)``.

    ``forward_selected`` takes inputs already gathered by the trainer (see its docstring).
    """

    def __init__(self, *args, backend: str = "auto", check_finite: bool = False,
                 inplace_grad: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in LOSS_BACKENDS:
            raise ValueError(f"IBOTLoss: backend must be one of {LOSS_BACKENDS}, got "
                             f"{backend!r}")
        if inplace_grad and backend == "eager":
            raise ValueError("IBOTLoss: inplace_grad=True needs a fused backend ('auto', "
                             "'triton' or 'torch'); backend='eager' is the reference path")
        self.backend = backend
        self.check_finite = check_finite
        self.inplace_grad = bool(inplace_grad)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}" + \
            (", inplace_grad=True" if self.inplace_grad else "")

    # ---- pieces shared by forward and forward_selected -------------------------------------
    def _cls_pairs(self, B: int, device, dtype):
        """Partner table of the [CLS] term: student row v*B+b pairs with teacher rows q*B+b,
        q < ngcrops, weight lambda1/(n1 B) when q != v (0 for the same view)."""
        ng, nc = self.ngcrops, self.ncrops
        v = torch.arange(nc, device=device).view(nc, 1, 1)
        b = torch.arange(B, device=device).view(1, B, 1)
        q = torch.arange(ng, device=device).view(1, 1, ng)
        partner_MP = (q * B + b).expand(nc, B, ng).reshape(nc * B, ng)
        weight_MP = (v != q).to(dtype).expand(nc, B, ng).reshape(nc * B, ng)
        return partner_MP, weight_MP * (self.lambda1 / ((ng * nc - ng) * B))

    def _cls_loss(self, student_cls, teacher_cls, student_local_cls, B, tau,
                  inplace_grad=False):
        if self.nlcrops > 0:
            student_cls = torch.cat([student_cls, student_local_cls])
        wdt = _compute_dtype(student_cls, teacher_cls, self.center)
        partner_MP, weight_MP = self._cls_pairs(B, student_cls.device, wdt)
        return soft_ce(student_cls, teacher_cls, partner_MP, weight_MP,
                       self._teacher_center(self.center, teacher_cls, tau), self.student_temp,
                       tau, backend=self.backend, inplace_grad=inplace_grad)

    def _teacher_center(self, ema_center, teacher_TK, tau, row_valid_T=None):
        """The EMA buffer, or the Sinkhorn-Knopp targets written as a centre (no grad)."""
        if self.center_mode == "ema":
            return ema_center
        return sinkhorn_knopp_center(teacher_TK, tau, self.sinkhorn_iterations,
                                     row_valid_T=row_valid_T)

    def _check_teacher_finite(self, **tensors):
        if self.check_finite:
            for name, t in tensors.items():
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"IBOTLoss: {name} contains NaN or Inf (check_finite=True)")

    # ---- the drop-in ----------------------------------------------------------------------
    def forward(self, student_output, teacher_output, student_local_cls: Optional[torch.Tensor],
                student_mask: Sequence[torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """Same arguments and result as ``IBOTLossReference.forward`` (the reference's)."""
        if self.backend == "eager":
            return super().forward(student_output, teacher_output, student_local_cls,
                                   student_mask, epoch)
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
        B, N = self._check_inputs(student_cls, student_patch, teacher_cls, teacher_patch,
                                  student_local_cls, student_mask)
        self._check_teacher_finite(**{"teacher_output[0]": teacher_cls,
                                      "teacher_output[1]": teacher_patch})
        inplace = self.inplace_grad
        if inplace:  # named like the caller's arguments (soft_ce would say student_MK)
            _check_inplace("IBOTLoss: student_output[1] (patch logits)", student_patch,
                           teacher_patch)
            if self.nlcrops == 0:
                _check_inplace("IBOTLoss: student_output[0] ([CLS] logits)", student_cls,
                               teacher_cls)
        tau, tau2 = self.temperatures(epoch)
        ng, K2 = self.ngcrops, self.patch_out_dim
        loss_cls = self._cls_loss(student_cls, teacher_cls, student_local_cls, B, tau,
                                  inplace_grad=inplace)

        # Patch rows pair with themselves (student token r <-> teacher token r); unmasked rows
        # have weight 0, so no kernel reads them and their gradient is an exact 0.
        rows = ng * B * N
        teacher_TK = teacher_patch.reshape(rows, K2)
        wdt = _compute_dtype(student_patch, teacher_patch, self.center2)
        mask_QBN = torch.stack([student_mask[q].reshape(B, N) for q in range(ng)])
        mask_QBN = mask_QBN.to(device=student_patch.device, dtype=wdt)
        weight_M1 = (mask_QBN / mask_QBN.sum(dim=-1, keepdim=True).clamp(min=1.0)
                     * (self.lambda2 / (ng * B))).reshape(rows, 1)
        partner_M1 = torch.arange(rows, device=student_patch.device).view(rows, 1)
        center2 = self._teacher_center(self.center2, teacher_TK, tau2,
                                       row_valid_T=mask_QBN.reshape(rows) != 0)
        loss_patch = soft_ce(student_patch.reshape(rows, K2), teacher_TK, partner_M1,
                             weight_M1, center2, self.student_temp, tau2, backend=self.backend,
                             inplace_grad=inplace)

        # Centres after the loss (it used the previous step's); all tokens, masked or not.
        if self.center_mode == "ema":
            self._update_center_from_sums(teacher_col_sum(teacher_cls),
                                          teacher_col_sum(teacher_TK) / N, ng * B)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)

    # ---- the selected-rows entry points (fast trainer path) --------------------------------
    def forward_selected(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor,
                         student_local_cls: Optional[torch.Tensor],
                         student_patch_rows: torch.Tensor, teacher_patch_rows: torch.Tensor,
                         patch_weight: torch.Tensor, teacher_patch_mean: torch.Tensor,
                         epoch: int, *, temperatures=None) -> dict[str, torch.Tensor]:
        """The loss from rows the trainer already gathered; same result and centre update as
        ``forward`` on the full tensors.

        student_cls, teacher_cls: ``[ngcrops*B, K]`` [CLS] logits of the global crops
            (crop-major); student_local_cls: ``[nlcrops*B, K]`` or None.
        student_patch_rows, teacher_patch_rows: ``[M, K2]``, the student's and the teacher's
            logits of the same masked tokens, row for row (from ``masked_patch_rows``: the
            head runs on these rows only). Padding rows are allowed (weight 0).
        patch_weight: ``[M]``, ``1 / (ngcrops * B * max(count_b, 1))`` per masked row, 0 for
            padding (``masked_patch_rows`` returns it); lambda2 is applied here.
        teacher_patch_mean: ``[K2]``, the mean of the teacher patch logits over *all*
            ``ngcrops*B*N`` tokens of this rank (masked or not) -- for the centre. By linearity
            of the bias-free last layer it is ``W2 @ mean(z_hat)`` over the 256-d normalised
            bottleneck vectors, so the 8192-way layer never runs on unmasked tokens.
            Not used with ``center="sinkhorn_knopp"`` (whose samples are the rows with a
            non-zero ``patch_weight``).
        epoch: index into the temperature schedules.
        temperatures: optional ``(tau, tau2)`` used instead of ``temperatures(epoch)`` (the
            compiled fast step passes that epoch's values as 0-dim tensors, graph inputs, so a
            new epoch's temperature does not recompile the step).

        No host syncs; the returned dict and the centre update match ``forward``.
        """
        where = "IBOTLoss.forward_selected"
        B = self._check_selected_cls(where, student_cls, teacher_cls, student_local_cls)
        K2 = self.patch_out_dim
        if student_patch_rows.dim() != 2 or student_patch_rows.shape[1] != K2:
            raise ValueError(f"{where}: student_patch_rows must be [M, patch_out_dim={K2}], got "
                             f"{tuple(student_patch_rows.shape)}")
        M = student_patch_rows.shape[0]
        if tuple(teacher_patch_rows.shape) != (M, K2):
            raise ValueError(f"{where}: teacher_patch_rows must be [M={M}, {K2}] like "
                             f"student_patch_rows, got {tuple(teacher_patch_rows.shape)}")
        self._check_selected_patch(where, M, patch_weight, teacher_patch_mean)
        teacher_cls, teacher_patch_rows = teacher_cls.detach(), teacher_patch_rows.detach()
        self._check_teacher_finite(teacher_cls=teacher_cls,
                                   teacher_patch_rows=teacher_patch_rows,
                                   teacher_patch_mean=teacher_patch_mean)
        tau, tau2 = self.temperatures(epoch) if temperatures is None else temperatures
        loss_cls = self._cls_loss(student_cls, teacher_cls, student_local_cls, B, tau)
        partner_M1, weight_M1 = self._selected_pairs(
            patch_weight, _compute_dtype(student_patch_rows, teacher_patch_rows, self.center2))
        # Sinkhorn-Knopp samples: the masked rows, not the padding (weight 0)
        center2 = self._teacher_center(self.center2, teacher_patch_rows, tau2,
                                       row_valid_T=patch_weight != 0)
        loss_patch = soft_ce(student_patch_rows, teacher_patch_rows, partner_M1, weight_M1,
                             center2, self.student_temp, tau2, backend=self.backend)
        return self._selected_finish(loss_cls, loss_patch, teacher_cls, teacher_patch_mean, B)

    def forward_selected_linear(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor,
                                student_local_cls: Optional[torch.Tensor],
                                student_patch_z: torch.Tensor, student_patch_w: torch.Tensor,
                                teacher_patch_z: torch.Tensor, teacher_patch_w: torch.Tensor,
                                patch_weight: torch.Tensor, teacher_patch_mean: torch.Tensor,
                                epoch: int, *, temperatures=None) -> dict[str, torch.Tensor]:
        """``forward_selected`` with the patch head's last layer fused into the patch loss
        (``fused_loss.soft_ce_linear``): the patch logits are ``student_patch_z @
        student_patch_w.T`` and ``teacher_patch_z @ teacher_patch_w.T`` but neither ``[M, K2]``
        tensor is materialised. Same result, gradients and centre update as
        ``forward_selected`` on those logits.

        student_patch_z, teacher_patch_z: ``[M, D]`` L2-normalised bottleneck vectors of the
            masked tokens, row for row (student: gets a gradient).
        student_patch_w, teacher_patch_w: ``[K2, D]`` weight-normed last-layer weights (the
            student's gets a gradient, which autograd carries on to ``weight_v``/``weight_g``).
        Other arguments as in ``forward_selected``. EMA centring only (Sinkhorn-Knopp needs
        the teacher logits themselves).
        """
        where = "IBOTLoss.forward_selected_linear"
        if self.center_mode != "ema":
            raise ValueError(f"{where}: center={self.center_mode!r} needs the teacher patch "
                             f"logits; use forward_selected (unfused head) with it")
        B = self._check_selected_cls(where, student_cls, teacher_cls, student_local_cls)
        K2 = self.patch_out_dim
        if student_patch_z.dim() != 2:
            raise ValueError(f"{where}: student_patch_z must be [M, D], got "
                             f"{tuple(student_patch_z.shape)}")
        M, D = student_patch_z.shape
        for name, t, shape in (("teacher_patch_z", teacher_patch_z, (M, D)),
                               ("student_patch_w", student_patch_w, (K2, D)),
                               ("teacher_patch_w", teacher_patch_w, (K2, D))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: {name} must be {list(shape)} (M, D of "
                                 f"student_patch_z; K2 = patch_out_dim), got {tuple(t.shape)}")
        self._check_selected_patch(where, M, patch_weight, teacher_patch_mean)
        teacher_cls = teacher_cls.detach()
        teacher_patch_z, teacher_patch_w = teacher_patch_z.detach(), teacher_patch_w.detach()
        self._check_teacher_finite(teacher_cls=teacher_cls, teacher_patch_z=teacher_patch_z,
                                   teacher_patch_w=teacher_patch_w,
                                   teacher_patch_mean=teacher_patch_mean)
        tau, tau2 = self.temperatures(epoch) if temperatures is None else temperatures
        loss_cls = self._cls_loss(student_cls, teacher_cls, student_local_cls, B, tau)
        partner_M1, weight_M1 = self._selected_pairs(
            patch_weight, _compute_dtype(student_patch_z, student_patch_w, teacher_patch_z,
                                         teacher_patch_w, self.center2))
        loss_patch = soft_ce_linear(student_patch_z, student_patch_w, teacher_patch_z,
                                    teacher_patch_w, partner_M1, weight_M1, self.center2,
                                    self.student_temp, tau2, backend=self.backend)
        return self._selected_finish(loss_cls, loss_patch, teacher_cls, teacher_patch_mean, B)

    # ---- pieces of the two selected-rows entry points ----------------------------------------
    def _check_selected_cls(self, where, student_cls, teacher_cls, student_local_cls) -> int:
        """Shape checks of the [CLS] inputs; returns B."""
        ng, nl, K = self.ngcrops, self.nlcrops, self.out_dim
        if self.backend == "eager":
            raise ValueError(f"{where}: backend='eager' is the dense reference path; use "
                             f"'auto', 'triton' or 'torch' here")
        if student_cls.dim() != 2 or student_cls.shape[1] != K or student_cls.shape[0] == 0 \
                or student_cls.shape[0] % ng:
            raise ValueError(f"{where}: student_cls must be [ngcrops*B, out_dim={K}], got "
                             f"{tuple(student_cls.shape)}")
        B = student_cls.shape[0] // ng
        if tuple(teacher_cls.shape) != tuple(student_cls.shape):
            raise ValueError(f"{where}: teacher_cls {tuple(teacher_cls.shape)} does not match "
                             f"student_cls {tuple(student_cls.shape)}")
        local_shape = None if student_local_cls is None else tuple(student_local_cls.shape)
        if nl > 0 and local_shape != (nl * B, K):
            raise ValueError(f"{where}: student_local_cls must be [nlcrops*B, out_dim] = "
                             f"{(nl * B, K)}, got {local_shape}")
        if nl == 0 and student_local_cls is not None and student_local_cls.numel() > 0:
            raise ValueError(f"{where}: nlcrops=0 but student_local_cls was given")
        return B

    def _check_selected_patch(self, where, M, patch_weight, teacher_patch_mean):
        if tuple(patch_weight.shape) != (M,):
            raise ValueError(f"{where}: patch_weight must be [M={M}], got "
                             f"{tuple(patch_weight.shape)}")
        if teacher_patch_mean.numel() != self.patch_out_dim:
            raise ValueError(f"{where}: teacher_patch_mean must have patch_out_dim="
                             f"{self.patch_out_dim} elements, got "
                             f"{tuple(teacher_patch_mean.shape)}")

    def _selected_pairs(self, patch_weight, dtype):
        """Patch rows pair with themselves: (partner [M, 1], weight [M, 1] with lambda2)."""
        M = patch_weight.shape[0]
        weight_M1 = (patch_weight.to(dtype) * self.lambda2).view(M, 1)
        return torch.arange(M, device=patch_weight.device).view(M, 1), weight_M1

    def _selected_finish(self, loss_cls, loss_patch, teacher_cls, teacher_patch_mean, B):
        """The centre update from the [CLS] rows and the all-token patch mean (EMA only)."""
        if self.center_mode == "ema":
            rows, K2 = self.ngcrops * B, self.patch_out_dim
            patch_sum = teacher_patch_mean.detach().reshape(K2).to(
                _compute_dtype(teacher_patch_mean, teacher_cls)) * rows
            self._update_center_from_sums(teacher_col_sum(teacher_cls), patch_sum, rows)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)
