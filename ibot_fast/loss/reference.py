r"""``IBOTLossReference``: the iBOT loss written out densely and eagerly, line by line.

A drop-in for the reference ``iBOTLoss`` (bytedance/ibot ``main_ibot.py``): same constructor,
same ``forward`` signature, same returned dict and the same state-dict keys (``center``,
``center2``). It evaluates every patch token, like the reference, and is the ground truth
every fast path is tested against. Its sibling ``IBOTLoss`` (``loss/ibot.py``) computes the
same on the fused op; what both share (arguments, centres, schedules, checks) is
``loss/common.py``. This docstring is the account of the maths both implement.

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

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ibot_fast.loss.common import IBOTLossBase, upcast
from ibot_fast.loss.sinkhorn import sinkhorn_knopp_targets

__all__ = ["IBOTLossReference", "ibot_loss_dense"]


def ibot_loss_dense(loss: IBOTLossBase, student_output, teacher_output,
                    student_local_cls: Optional[torch.Tensor],
                    student_mask: Sequence[torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
    """The loss of one step on every token, then the centre update (EMA centring), for the
    arguments, centres and schedules held by `loss` (``IBOTLossReference.forward``; also
    ``IBOTLoss(backend="eager")``). Inputs as in ``IBOTLossReference.forward``."""
    student_cls, student_patch = student_output
    teacher_cls, teacher_patch = teacher_output
    teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
    B, N = loss.check_inputs(student_cls, student_patch, teacher_cls, teacher_patch,
                             student_local_cls, student_mask)
    tau, tau2 = loss.temperatures(epoch)
    ng, nc = loss.ngcrops, loss.ncrops

    # ---- [CLS]: every pair (teacher global q, student crop v != q) --------------------------
    if loss.nlcrops > 0:
        student_cls = torch.cat([student_cls, student_local_cls])
    # log_softmax once per student crop (the reference recomputes it for every q).
    logp_cls_VBK = F.log_softmax(upcast(student_cls) / loss.student_temp, dim=-1)
    logp_cls_VBK = logp_cls_VBK.view(nc, B, loss.out_dim)
    sk = loss.center_mode == "sinkhorn_knopp"
    if sk:
        p_cls_QBK = sinkhorn_knopp_targets(teacher_cls, tau, loss.sinkhorn_iterations)
    else:
        p_cls_QBK = F.softmax((upcast(teacher_cls) - loss.center) / tau, dim=-1)
    p_cls_QBK = p_cls_QBK.view(ng, B, loss.out_dim)
    total_cls = logp_cls_VBK.new_zeros(())
    for q in range(ng):
        # ce_V[v] = mean_b(-sum_k P_q log p_v), for all student crops v at once.
        ce_V = -(p_cls_QBK[q] * logp_cls_VBK).sum(dim=-1).mean(dim=-1)
        total_cls = total_cls + ce_V[:q].sum() + ce_V[q + 1:].sum()
    loss_cls = total_cls / (ng * nc - ng) * loss.lambda1

    # ---- patch (MIM): same view only, per-image mean over masked tokens -------------------
    # Dense over all N tokens, like the reference: unmasked tokens are weighted by 0, so
    # their gradient is exactly 0. (The fused kernel evaluates masked rows only.)
    logp_patch = F.log_softmax(upcast(student_patch) / loss.student_temp, dim=-1)
    mask_QBN = torch.stack([student_mask[q].reshape(B, N) for q in range(ng)])
    mask_QBN = mask_QBN.to(device=logp_patch.device, dtype=logp_patch.dtype)
    if sk:  # Sinkhorn-Knopp over the masked teacher rows only; other rows are masked out
        rows_T = mask_QBN.reshape(-1) != 0
        t_patch = sinkhorn_knopp_targets(teacher_patch.reshape(-1, loss.patch_out_dim), tau2,
                                         loss.sinkhorn_iterations, row_valid_T=rows_T)
        t_patch = t_patch.to(logp_patch.dtype).view_as(logp_patch)
    else:
        t_patch = F.softmax((upcast(teacher_patch) - loss.center2) / tau2, dim=-1)
    ce_QBN = -(t_patch * logp_patch).sum(dim=-1).view(ng, B, N)
    img_QB = (ce_QBN * mask_QBN).sum(dim=-1) / mask_QBN.sum(dim=-1).clamp(min=1.0)
    loss_patch = img_QB.mean(dim=-1).sum() / ng * loss.lambda2

    # The loss above used the previous step's centres; now update them.
    if not sk:
        loss.update_center(teacher_cls, teacher_patch)
    return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)


class IBOTLossReference(IBOTLossBase):
    """iBOT [CLS] self-distillation + masked-patch (MIM) loss with teacher centring, eager and
    dense (the ground truth of the fused ``IBOTLoss``).

    See the module docstring for the maths and ``IBOTLossBase`` for the arguments (the
    reference's, in its order, plus keyword-only ``center`` and ``sinkhorn_iterations``).
    """

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
        return ibot_loss_dense(self, student_output, teacher_output, student_local_cls,
                               student_mask, epoch)
