"""What the two iBOT loss modules share: arguments, centres, temperatures, input checks.

``IBOTLossBase`` holds the state and the rules of the reference ``iBOTLoss`` that do not depend
on how the loss is computed: the constructor's arguments (the reference's, in its order), the
centre buffers ``center`` / ``center2`` and their EMA update, the per-epoch teacher temperature
schedules, and the shape checks of ``forward``'s inputs. ``IBOTLossReference``
(``loss/reference.py``, dense and eager) and ``IBOTLoss`` (``loss/ibot.py``, on the fused op)
are siblings built on it; neither is the other's base class. The maths of the loss is in
``loss/reference.py``.

Also here: the few functions the loss modules and the adapters (``loss/compat.py``) share.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ibot_fast.dist import get_world_size
from ibot_fast.kernels.soft_ce import compute_dtype  # noqa: F401 - re-exported for the loss modules
from ibot_fast.schedules import teacher_temp_schedule

__all__ = ["IBOTLossBase", "CENTERINGS", "upcast", "compute_dtype", "check_center_mode",
           "check_sinkhorn_iterations"]

CENTERINGS = ("ema", "sinkhorn_knopp")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (the precision every softmax runs in)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_center_mode(center: str, where: str) -> None:
    if center not in CENTERINGS:
        raise ValueError(f"{where}: center must be one of {CENTERINGS}, got {center!r}")


def check_sinkhorn_iterations(n: int, where: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: sinkhorn_iterations must be an int >= 1, got {n!r}")


class IBOTLossBase(nn.Module):
    """Arguments, centres, temperature schedules and input checks of the iBOT loss.

    Positional arguments follow the reference ``iBOTLoss``: ``out_dim, patch_out_dim, ngcrops,
    nlcrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp2, teacher_temp2,
    warmup_teacher_temp_epochs, nepochs``, then ``student_temp, center_momentum,
    center_momentum2, lambda1, lambda2, mim_start_epoch``. Keyword-only: ``center`` (``"ema"``,
    the reference's, or ``"sinkhorn_knopp"``, DINOv2/v3's; see ``loss/sinkhorn.py``) and
    ``sinkhorn_iterations`` (3). State dict: ``center`` ``[1, K]`` and ``center2``
    ``[1, 1, K2]``, as in the reference.
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
        where = type(self).__name__
        check_center_mode(center, where)
        check_sinkhorn_iterations(sinkhorn_iterations, where)
        # ``center`` names the buffer (reference state dict), so the option lives here
        self.center_mode = center
        self.sinkhorn_iterations = sinkhorn_iterations
        if ngcrops < 1:
            raise ValueError(f"{where}: ngcrops must be >= 1 (got {ngcrops})")
        if nlcrops < 0:
            raise ValueError(f"{where}: nlcrops must be >= 0 (got {nlcrops})")
        if ngcrops + nlcrops < 2:
            # The [CLS] term needs at least one pair v != q; the reference divides by zero here.
            raise ValueError(f"{where}: the [CLS] loss needs at least 2 crops in total "
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
            raise IndexError(f"{type(self).__name__}: epoch {epoch} is outside the teacher "
                             f"temperature schedule, which covers epochs 0..{nepochs - 1} "
                             f"(nepochs={nepochs})")
        return float(self.teacher_temp_schedule[epoch]), float(self.teacher_temp2_schedule[epoch])

    # ---- centres ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the global mean of the raw teacher logits (all rows of all ranks), from
        ``teacher_cls`` ``[ngcrops*B, K]`` and ``teacher_patch`` ``[ngcrops*B, N, K2]``.

        Like the reference, every rank must hold the same number of rows (the all-reduced sum
        is divided by ``rows * world_size``). Without an initialised process group the world
        size is 1 and no collective is issued.
        """
        rows = teacher_cls.shape[0]
        cls_sum_K = upcast(teacher_cls).sum(dim=0)
        # Mean over all N tokens of each image (masked or not), summed over images.
        patch_sum_K2 = upcast(teacher_patch).mean(dim=1).sum(dim=0)
        self.update_center_from_sums(cls_sum_K, patch_sum_K2, rows)

    @torch.no_grad()
    def update_center_from_sums(self, cls_sum_K: torch.Tensor, patch_sum_K2: torch.Tensor,
                                rows: int) -> None:
        """EMA step from this rank's sums: ``cls_sum_K`` = sum of the teacher [CLS] logits over
        its ``rows`` global-crop rows, ``patch_sum_K2`` = sum over those rows of each row's mean
        over all N patch tokens. All-reduced when a process group is initialised."""
        world_size = get_world_size()
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

    # ---- input checks ----------------------------------------------------------------------
    def check_inputs(self, student_cls: torch.Tensor, student_patch: torch.Tensor,
                     teacher_cls: torch.Tensor, teacher_patch: torch.Tensor,
                     student_local_cls, student_mask: Sequence[torch.Tensor]) -> tuple[int, int]:
        """Shape checks of ``forward``'s inputs (metadata only, no device syncs).
        Returns ``(B, N)``."""
        ng, nl, K, K2 = self.ngcrops, self.nlcrops, self.out_dim, self.patch_out_dim
        where = f"{type(self).__name__}.forward"
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
        if student_patch.dim() != 3 or student_patch.shape[0] != rows or \
                student_patch.shape[-1] != K2:
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
