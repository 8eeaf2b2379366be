r"""The iBOT loss: a drop-in for the reference ``iBOTLoss`` (bytedance/ibot ``main_ibot.py``).

Same constructor, same ``forward`` signature, same returned dict and the same state-dict keys
(``center``, ``center2``). This is the eager PyTorch path; fused kernels are tested against it.
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

from ibot_fast.schedules import teacher_temp_schedule

__all__ = ["IBOTLoss"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class IBOTLoss(nn.Module):
    """iBOT [CLS] self-distillation + masked-patch (MIM) loss with teacher centring.

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
                 mim_start_epoch: int = 0):
        super().__init__()
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
                f"lambda2={self.lambda2}, mim_start_epoch={self.mim_start_epoch}")

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
        t_patch = F.softmax((_upcast(teacher_patch) - self.center2) / tau2, dim=-1)
        ce_QBN = -(t_patch * logp_patch).sum(dim=-1).view(ng, B, N)
        mask_QBN = torch.stack([student_mask[q].reshape(B, N) for q in range(ng)])
        mask_QBN = mask_QBN.to(device=ce_QBN.device, dtype=ce_QBN.dtype)
        img_QB = (ce_QBN * mask_QBN).sum(dim=-1) / mask_QBN.sum(dim=-1).clamp(min=1.0)
        loss_patch = img_QB.mean(dim=-1).sum() / ng * self.lambda2

        # The loss above used the previous step's centres; now update them.
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
