"""``IBOTLoss``: the iBOT loss on the fused soft-target CE op.

A drop-in for the reference ``iBOTLoss`` (same constructor, ``forward``, returned dict and state
dict as its sibling ``IBOTLossReference``, ``loss/reference.py``, whose docstring states the
maths) that computes every term with ``ibot_fast.kernels.soft_ce``: weighted, centred,
temperature-scaled soft-target cross-entropy over row pairs, gradient computed in the forward
pass, no ``[rows, K]`` probability tensor kept. The [CLS] term is one call over the pairs of
``pairs.cls_pairs``; the patch term one call over the masked rows only, each paired with itself
(unmasked tokens get an exact zero gradient without being read); the centres still average
every teacher token (``IBOTLossBase.update_center_from_sums``).

Entry points:

* ``forward`` -- the reference's dense inputs;
* ``forward_selected`` -- inputs the trainer already gathered (the masked rows, from
  ``pairs.masked_patch_rows``, and the mean of all teacher patch logits), no host sync;
* ``forward_selected_linear`` -- the same with the patch head's last layer fused into the patch
  loss (``ibot_fast.kernels.soft_ce_linear``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ibot_fast.kernels.soft_ce import (BACKENDS, check_inplace_grad, soft_ce, soft_ce_linear,
                                       teacher_col_sum)
from ibot_fast.loss.common import IBOTLossBase, compute_dtype
from ibot_fast.loss.pairs import cls_pairs
from ibot_fast.loss.reference import ibot_loss_dense
from ibot_fast.loss.sinkhorn import sinkhorn_knopp_center

__all__ = ["IBOTLoss", "LOSS_BACKENDS"]

# the op's back ends, plus the dense reference path
LOSS_BACKENDS = (*BACKENDS, "eager")


class IBOTLoss(IBOTLossBase):
    """The iBOT loss on the fused op: a drop-in for the reference ``iBOTLoss``.

    Constructor (``IBOTLossBase``: the reference's arguments), ``forward``, returned dict and
    state dict as its sibling ``IBOTLossReference`` (the reference's), plus keyword-only
    options:

    backend: ``"auto"`` (Triton on CUDA, chunked torch otherwise), ``"triton"``, ``"torch"``,
        or ``"eager"`` (the dense reference path, ``reference.ibot_loss_dense``, which is
        ``IBOTLossReference.forward``).
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
        an inplace operation" error at backward (see ``ibot_fast.kernels.soft_ce``).
    center (``IBOTLossBase``): ``"ema"`` (the reference's EMA centres) or
        ``"sinkhorn_knopp"`` (DINOv2/v3; ``sinkhorn_iterations=3``): the Sinkhorn-Knopp target
        is ``softmax((t - c)/tau)`` for a per-batch vector ``c``
        (``sinkhorn.sinkhorn_knopp_center``), so it runs through the same fused op.

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
    def _cls_loss(self, student_cls, teacher_cls, student_local_cls, B, tau,
                  inplace_grad=False):
        if self.nlcrops > 0:
            student_cls = torch.cat([student_cls, student_local_cls])
        wdt = compute_dtype(student_cls, teacher_cls, self.center)
        partner_MP, weight_MP = cls_pairs(self.ngcrops, self.ncrops, B, student_cls.device, wdt,
                                          scale=self.lambda1)
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
            return ibot_loss_dense(self, student_output, teacher_output, student_local_cls,
                                   student_mask, epoch)
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
        B, N = self.check_inputs(student_cls, student_patch, teacher_cls, teacher_patch,
                                  student_local_cls, student_mask)
        self._check_teacher_finite(**{"teacher_output[0]": teacher_cls,
                                      "teacher_output[1]": teacher_patch})
        inplace = self.inplace_grad
        if inplace:  # named like the caller's arguments (soft_ce would say student_MK)
            check_inplace_grad("IBOTLoss: student_output[1] (patch logits)", student_patch,
                           teacher_patch)
            if self.nlcrops == 0:
                check_inplace_grad("IBOTLoss: student_output[0] ([CLS] logits)", student_cls,
                               teacher_cls)
        tau, tau2 = self.temperatures(epoch)
        ng, K2 = self.ngcrops, self.patch_out_dim
        loss_cls = self._cls_loss(student_cls, teacher_cls, student_local_cls, B, tau,
                                  inplace_grad=inplace)

        # Patch rows pair with themselves (student token r <-> teacher token r); unmasked rows
        # have weight 0, so no kernel reads them and their gradient is an exact 0.
        rows = ng * B * N
        teacher_TK = teacher_patch.reshape(rows, K2)
        wdt = compute_dtype(student_patch, teacher_patch, self.center2)
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
            self.update_center_from_sums(teacher_col_sum(teacher_cls),
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
            logits of the same masked tokens, row for row (from ``pairs.masked_patch_rows``: the
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
            patch_weight, compute_dtype(student_patch_rows, teacher_patch_rows, self.center2))
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
        (``ibot_fast.kernels.soft_ce_linear``): the patch logits are ``student_patch_z @
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
            patch_weight, compute_dtype(student_patch_z, student_patch_w, teacher_patch_z,
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
                compute_dtype(teacher_patch_mean, teacher_cls)) * rows
            self.update_center_from_sums(teacher_col_sum(teacher_cls), patch_sum, rows)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)
