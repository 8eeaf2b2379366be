r"""The fused iBOT patch loss in the shapes other repositories already call.

The compatibility layer of the loss stack (op ``ibot_fast.kernels.soft_ce`` -> modules
``IBOTLoss`` / ``IBOTLossReference`` -> these adapters). Both adapters run on the op
(``backend="auto"|"triton"|"torch"``): the patch rows are the student-major pairs ``student
row r <-> teacher row r`` with one weight per row, and the gradient is computed in the forward
pass.

``IBOTPatchLoss`` -- LightlySSL's ``lightly.loss.IBOTPatchLoss`` (its API since LightlySSL 1.5.21)
    ``IBOTPatchLoss(output_dim=65536, teacher_temp=0.04, student_temp=0.1, center_mode="mean",
    center_momentum=0.9)``, ``forward(teacher_out, student_out, mask, teacher_temp=None)``:
    teacher/student logits of the masked tokens ``[M, K]``, in the order of ``mask[mask]``;
    ``mask`` bool ``[B, H, W]``; ``teacher_temp`` the teacher temperature of this step (the
    caller's warm-up schedule), ``None`` for the constructor's::

        loss = sum_r w_r * sum_k -softmax((t_r - c)/tau_t)_k log_softmax(s_r/tau_s)_k
        w_r  = 1 / (B * max(count_b(r), 1))                       (normalize="image")
        tau_t = teacher_temp if given, else the constructor's teacher_temp

    then ``c <- m c + (1 - m) * mean_r t_r`` (the masked teacher rows of this rank, then the mean
    over ranks). Same state-dict key (``center.center``, ``[1, K]``). On purpose: a batch without
    masked rows leaves the centre as it is (Lightly's mean over zero rows makes it NaN for good;
    a rank without rows drops out of the mean over ranks).

``DINOv2PatchLoss`` -- DINOv2's ``dinov2.loss.iBOTPatchLoss``
    ``DINOv2PatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)`` with DINOv2's
    methods: ``softmax_center_teacher``, ``sinkhorn_knopp_teacher`` (masked-token variant),
    ``forward`` (dense ``[B, N, K]``), ``forward_masked(student_patch_tokens_masked,
    teacher_patch_tokens_masked, student_masks_flat, n_masked_patches=None, masks_weight=None)``
    and the asynchronous ``update_center``/``apply_center_update``; state-dict key ``center``
    (``[1, 1, K]``). As in DINOv2, ``forward``/``forward_masked`` take the teacher *targets*
    (probabilities, rows summing to 1)::

        forward_masked = sum_{r < n_masked_patches} masks_weight_r * CE(t_r, s_r) / B

    ``forward_masked(..., teacher_temp=tau)`` is the fused form: the teacher tensor holds raw
    logits, centred inside the op with the EMA buffer (``center="ema"``, pending update applied
    first) or by Sinkhorn-Knopp (``center="sinkhorn_knopp"``), and no ``[M, K]`` probability
    tensor is made. ``n_masked_patches`` may be a device tensor: rows past it get weight 0
    (no host sync; DINOv2 slices with it). The centre update is NaN-safe like Lightly's above.

Per-image normalisation (``normalize=``), with ``c_b`` the masked tokens of image b, ``B`` the
images, ``B+`` those with ``c_b > 0`` and ``C = sum_b c_b``:

* ``"image"`` (default) -- ``w = 1/(B max(c_b, 1))``: the mean over the masked tokens of each
  image, then the mean over *all* B images, an image without masked tokens adding 0. The
  reference iBOT (per-image mean, then the mean over images), DINOv2 and Lightly (weight
  ``1/count``, sum, divide by B) all compute exactly this.
* ``"masked_image"`` -- ``w = 1/(B+ c_b)``: images without masked tokens do not count.
* ``"token"`` -- ``w = 1/C``: every masked token of the batch weighs the same.

An explicit DINOv2 ``masks_weight`` is used as given and divided by B, as DINOv2 does (so only
with ``normalize="image"``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ibot_fast.dist import get_world_size
from ibot_fast.kernels.soft_ce import BACKENDS, soft_ce, teacher_col_sum
from ibot_fast.loss.common import check_center_mode, check_sinkhorn_iterations, compute_dtype
from ibot_fast.loss.sinkhorn import sinkhorn_knopp_center, sinkhorn_knopp_targets

__all__ = ["IBOTPatchLoss", "DINOv2PatchLoss", "PATCH_NORMS", "masked_row_weights",
           "dense_row_weights"]

PATCH_NORMS = ("image", "masked_image", "token")


# ---- row weights ------------------------------------------------------------------------------
def _check_normalize(normalize: str):
    if normalize not in PATCH_NORMS:
        raise ValueError(f"normalize must be one of {PATCH_NORMS}, got {normalize!r}")


def _flat_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dim() < 2 or mask.is_floating_point():
        raise ValueError(f"{name} must be a bool tensor [B, H, W] or [B, N], got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    return mask.reshape(mask.shape[0], -1) != 0


def _image_weights(count_B: torch.Tensor, normalize: str, dtype) -> torch.Tensor:
    """Weight of one masked token of each image (``normalize`` as in the module docstring)."""
    B = count_B.numel()
    per_token = 1.0 / count_B.clamp(min=1).to(dtype)
    if normalize == "image":
        return per_token / B
    if normalize == "masked_image":
        return per_token / (count_B > 0).sum().clamp(min=1).to(dtype)
    return (1.0 / count_B.sum().clamp(min=1).to(dtype)).expand(B)


def dense_row_weights(mask: torch.Tensor, normalize: str = "image",
                      dtype=torch.float32) -> torch.Tensor:
    """``[B*N]`` weights of every token of ``mask`` (``[B, H, W]`` or ``[B, N]``): 0 where not
    masked, the normalised weight where masked."""
    _check_normalize(normalize)
    m_BN = _flat_mask(mask, "mask")
    w_B = _image_weights(m_BN.sum(dim=1), normalize, dtype)
    return (m_BN.to(dtype) * w_B[:, None]).reshape(-1)


def masked_row_weights(mask: torch.Tensor, rows: Optional[int] = None,
                       normalize: str = "image", dtype=torch.float32) -> torch.Tensor:
    """``[rows]`` weights of the masked tokens in the order of ``mask[mask]`` (image-major),
    the layout Lightly and DINOv2 feed the head; rows past the number of masked tokens (padding
    of a static-shape buffer) get weight 0. ``rows`` defaults to that number (one host sync);
    given, nothing leaves the device (the image of each row is found by ``searchsorted`` on the
    running count, not by boolean indexing)."""
    _check_normalize(normalize)
    m_BN = _flat_mask(mask, "mask")
    B = m_BN.shape[0]
    count_B = m_BN.sum(dim=1)
    if rows is None:
        rows = int(count_B.sum())
    end_B = torch.cumsum(count_B, 0)
    image_R = torch.searchsorted(end_B, torch.arange(int(rows), device=m_BN.device), right=True)
    w_B = _image_weights(count_B, normalize, dtype)
    return torch.where(image_R < B, w_B[image_R.clamp(max=max(B - 1, 0))],
                       torch.zeros((), dtype=dtype, device=m_BN.device))


def _log_targets(targets_MK: torch.Tensor) -> torch.Tensor:
    """Probability targets as teacher logits for ``soft_ce`` (temperature 1, centre 0):
    ``softmax(log p) = p`` for rows summing to 1. Zeros become log(tiny), whose share of the
    softmax (~1e-38 each) is below fp32 resolution; -inf would make NaN in an all-zero block."""
    t = targets_MK.detach().to(compute_dtype(targets_MK))
    return torch.log(t.clamp_min(torch.finfo(t.dtype).tiny))


def _check_logits(name: str, x: torch.Tensor, K: int, where: str):
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{where}: {name} must be a floating [M, K={K}] tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _check_backend(backend: str, where: str):
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")


def _check_masked_count(mask_BN: torch.Tensor, rows: int, where: str):
    n = int(mask_BN.sum())  # a host sync: only with check_finite=True
    if n != rows:
        raise ValueError(f"{where}: mask has {n} masked tokens but the logits have {rows} rows "
                         f"(one row per masked token, in the order of mask[mask])")


def _identity_pairs(M: int, device) -> torch.Tensor:
    return torch.arange(M, device=device).view(M, 1)


# ---- NaN-safe centre statistics ------------------------------------------------------------------
def _mean_stat(sum_K: torch.Tensor, count, groups) -> torch.Tensor:
    """``[K + 1]``: (sum of per-group means, number of non-empty groups) of this rank, to be
    all-reduced. An empty rank or group contributes nothing instead of 0/0."""
    count = torch.as_tensor(count, dtype=sum_K.dtype, device=sum_K.device)
    has = (count > 0).to(sum_K.dtype) * groups
    mean_K = sum_K / count.clamp(min=1) * (count > 0).to(sum_K.dtype)
    return torch.cat([mean_K, has.reshape(1)])


def _ema_from_stat(center: torch.Tensor, stat: torch.Tensor, momentum: float):
    """``center <- m center + (1 - m) mean`` where some group had rows; unchanged otherwise."""
    mean_sum, n = stat[:-1], stat[-1]
    new = center * momentum + (mean_sum / n.clamp(min=1)).view_as(center) * (1 - momentum)
    center.copy_(torch.where(n > 0, new, center))


class _MeanCenter(nn.Module):
    """Lightly's ``Center`` (mode "mean"): the buffer ``center`` and ``value``/``update``."""

    def __init__(self, size, momentum: float):
        super().__init__()
        self.size = tuple(size)
        self.dim = tuple(i for i, s in enumerate(self.size) if s == 1)  # Lightly's attribute
        self.register_buffer("center", torch.zeros(self.size))
        self.momentum = momentum

    @property
    def value(self) -> torch.Tensor:
        return self.center

    @torch.no_grad()
    def update(self, x_RK: torch.Tensor) -> None:
        """EMA toward the mean of the rows of ``x_RK`` (mean per rank, then over ranks)."""
        stat = _mean_stat(teacher_col_sum(x_RK).to(self.center.dtype), x_RK.shape[0], 1.0)
        if get_world_size() > 1:
            dist.all_reduce(stat)
        _ema_from_stat(self.center, stat, self.momentum)


# ---- LightlySSL ---------------------------------------------------------------------------------
class IBOTPatchLoss(nn.Module):
    """LightlySSL's ``IBOTPatchLoss`` on the fused op (see the module docstring).

    Lightly's arguments (and defaults), plus keyword-only ``normalize`` (``"image"``, Lightly's,
    by default), ``backend`` and ``check_finite`` (NaN/Inf in the teacher logits and a masked
    count that does not match the rows raise ``ValueError``; host syncs). Lightly's attributes
    ``teacher_temp``, ``student_temp`` (``student_temperature`` before LightlySSL 1.5.21) and
    ``center`` (``value``, ``update``, buffer ``center``).
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04,
                 student_temp: float = 0.1,
                 center_mode: str = "mean", center_momentum: float = 0.9, *,
                 normalize: str = "image", backend: str = "auto", check_finite: bool = False):
        super().__init__()
        where = "IBOTPatchLoss"
        if center_mode != "mean":
            raise ValueError(f"{where}: center_mode must be 'mean' (as in Lightly), got "
                             f"{center_mode!r}")
        _check_normalize(normalize)
        _check_backend(backend, where)
        self.output_dim = output_dim
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.normalize = normalize
        self.backend = backend
        self.check_finite = check_finite
        self.center = _MeanCenter((1, output_dim), center_momentum)

    @property
    def student_temperature(self) -> float:
        """The attribute's name in LightlySSL before 2025 (now ``student_temp``)."""
        return self.student_temp

    @student_temperature.setter
    def student_temperature(self, value: float) -> None:
        self.student_temp = value

    def extra_repr(self) -> str:
        return (f"output_dim={self.output_dim}, teacher_temp={self.teacher_temp}, "
                f"student_temp={self.student_temp}, normalize={self.normalize!r}, "
                f"backend={self.backend!r}")

    def forward(self, teacher_out: torch.Tensor, student_out: torch.Tensor,
                mask: torch.Tensor, teacher_temp: Union[float, torch.Tensor, None] = None
                ) -> torch.Tensor:
        """teacher_out, student_out: ``[M, K]`` logits of the masked tokens (order of
        ``mask[mask]``); mask: bool ``[B, H, W]`` (or ``[B, N]``) with M tokens set;
        teacher_temp: this step's teacher temperature (a float or a one-element tensor, as
        Lightly's warm-up schedules give it), or None for the constructor's ``teacher_temp``."""
        where = "IBOTPatchLoss.forward"
        K = self.output_dim
        _check_logits("student_out", student_out, K, where)
        _check_logits("teacher_out", teacher_out, K, where)
        if teacher_out.shape != student_out.shape:
            raise ValueError(f"{where}: teacher_out {tuple(teacher_out.shape)} and student_out "
                             f"{tuple(student_out.shape)} must match (one row per masked token)")
        m_BN = _flat_mask(mask, "mask")
        M = student_out.shape[0]
        if self.check_finite:
            _check_masked_count(m_BN, M, where)
        teacher_out = teacher_out.detach()
        w_M = masked_row_weights(m_BN.to(student_out.device), M, self.normalize,
                                 dtype=compute_dtype(student_out, teacher_out))
        loss = soft_ce(student_out, teacher_out, _identity_pairs(M, student_out.device),
                       w_M.view(M, 1), self.center.value, self.student_temp,
                       self.teacher_temp if teacher_temp is None else teacher_temp,
                       backend=self.backend, check_finite=self.check_finite)
        self.center.update(teacher_out)
        return loss


# ---- DINOv2 -------------------------------------------------------------------------------------
def _n_valid_rows(n_masked_patches, T: int, device) -> Optional[torch.Tensor]:
    """bool ``[T]``: rows below ``n_masked_patches`` (an int or a one-element device tensor)."""
    if n_masked_patches is None:
        return None
    n = torch.as_tensor(n_masked_patches, device=device)
    if n.numel() != 1 or n.is_floating_point():
        raise ValueError(f"n_masked_patches must be an int or a one-element integer tensor, got "
                         f"{n_masked_patches!r}")
    return torch.arange(T, device=device) < n.reshape(())


class DINOv2PatchLoss(nn.Module):
    """DINOv2's ``iBOTPatchLoss`` on the fused op (see the module docstring).

    DINOv2's arguments, plus keyword-only ``center`` (``"ema"``, DINOv2's "centering", or
    ``"sinkhorn_knopp"``: used by ``forward_masked(..., teacher_temp=...)``),
    ``sinkhorn_iterations`` (3), ``normalize`` (``"image"``, DINOv2's), ``backend`` and
    ``check_finite``.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, center: str = "ema",
                 sinkhorn_iterations: int = 3, normalize: str = "image",
                 backend: str = "auto", check_finite: bool = False):
        super().__init__()
        where = "DINOv2PatchLoss"
        check_center_mode(center, where)
        check_sinkhorn_iterations(sinkhorn_iterations, where)
        _check_normalize(normalize)
        _check_backend(backend, where)
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_mode = center  # ``center`` is the buffer, as in DINOv2
        self.sinkhorn_iterations = sinkhorn_iterations
        self.normalize = normalize
        self.backend = backend
        self.check_finite = check_finite
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        # DINOv2's pending-update state: the all-reduce overlaps with the student's work
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None

    def extra_repr(self) -> str:
        return (f"patch_out_dim={self.patch_out_dim}, student_temp={self.student_temp}, "
                f"center={self.center_mode!r}, normalize={self.normalize!r}, "
                f"backend={self.backend!r}")

    # ---- teacher targets (DINOv2's API) --------------------------------------------------------
    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor,
                               teacher_temp: float) -> torch.Tensor:
        """``softmax((t - center)/teacher_temp)`` in fp32, after any pending centre update."""
        self.apply_center_update()
        t = teacher_patch_tokens.to(compute_dtype(teacher_patch_tokens))
        return torch.softmax((t - self.center.to(t.device)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor=None, n_iterations: int = 3):
        """DINOv2's Sinkhorn-Knopp targets of the masked teacher rows (``[..., K]``, fp32).
        Rows at or past ``n_masked_patches_tensor`` (padding) are not samples and get 0."""
        K = teacher_output.shape[-1]
        t_TK = teacher_output.reshape(-1, K)
        valid_T = _n_valid_rows(n_masked_patches_tensor, t_TK.shape[0], t_TK.device)
        q = sinkhorn_knopp_targets(t_TK, teacher_temp, n_iterations, row_valid_T=valid_T)
        return q.view(teacher_output.shape)

    # ---- losses -------------------------------------------------------------------------------
    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor,
                student_masks_flat: torch.Tensor) -> torch.Tensor:
        """Dense: student logits and teacher targets ``[B, N, K]``, masks ``[B, N]``."""
        where = "DINOv2PatchLoss.forward"
        K = self.patch_out_dim
        if student_patch_tokens.dim() != 3 or student_patch_tokens.shape[-1] != K:
            raise ValueError(f"{where}: student_patch_tokens must be [B, N, K={K}], got "
                             f"{tuple(student_patch_tokens.shape)}")
        if teacher_patch_tokens.shape != student_patch_tokens.shape:
            raise ValueError(f"{where}: teacher_patch_tokens {tuple(teacher_patch_tokens.shape)}"
                             f" must match student_patch_tokens "
                             f"{tuple(student_patch_tokens.shape)}")
        m_BN = _flat_mask(student_masks_flat, "student_masks_flat")
        B, N = student_patch_tokens.shape[:2]
        if tuple(m_BN.shape) != (B, N):
            raise ValueError(f"{where}: student_masks_flat must be [B={B}, N={N}], got "
                             f"{tuple(student_masks_flat.shape)}")
        s = student_patch_tokens.reshape(B * N, K)
        t = _log_targets(teacher_patch_tokens.reshape(B * N, K))
        w = dense_row_weights(m_BN.to(s.device), self.normalize, compute_dtype(s, t))
        return soft_ce(s, t, _identity_pairs(B * N, s.device), w.view(-1, 1),
                       t.new_zeros(K), self.student_temp, 1.0, backend=self.backend,
                       check_finite=self.check_finite)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor,
                       teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor,
                       n_masked_patches: Union[int, torch.Tensor, None] = None,
                       masks_weight: Optional[torch.Tensor] = None, *,
                       teacher_temp: Optional[float] = None) -> torch.Tensor:
        """DINOv2's ``forward_masked``: rows of the masked tokens ``[M, K]`` (student logits;
        teacher targets, or teacher logits when ``teacher_temp`` is given), masks ``[B, N]``.

        n_masked_patches: rows at or past it are padding (weight 0); int or device tensor.
        masks_weight: ``[<= M]`` per-row weights (DINOv2's collate output), divided by B here;
            default ``1/max(count_b, 1)`` per masked token in ``mask[mask]`` order (and the
            ``normalize`` choice).
        teacher_temp: the fused form -- centre and sharpen the teacher logits inside the op
            (``center="ema"``: the buffer after any pending update; ``"sinkhorn_knopp"``: over
            the rows below ``n_masked_patches``). The centre is not updated here: call
            ``update_center`` as in DINOv2.
        """
        where = "DINOv2PatchLoss.forward_masked"
        K = self.patch_out_dim
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        _check_logits("student_patch_tokens_masked", s, K, where)
        _check_logits("teacher_patch_tokens_masked", t, K, where)
        if t.shape != s.shape:
            raise ValueError(f"{where}: teacher_patch_tokens_masked {tuple(t.shape)} must match "
                             f"student_patch_tokens_masked {tuple(s.shape)} row for row")
        m_BN = _flat_mask(student_masks_flat, "student_masks_flat").to(s.device)
        M, B = s.shape[0], m_BN.shape[0]
        valid_M = _n_valid_rows(n_masked_patches, M, s.device)
        wdt = compute_dtype(s, t)
        if masks_weight is None:
            if self.check_finite and n_masked_patches is None:
                _check_masked_count(m_BN, M, where)
            w_M = masked_row_weights(m_BN, M, self.normalize, dtype=wdt)
        else:
            if self.normalize != "image":
                raise ValueError(f"{where}: masks_weight is divided by B (DINOv2's "
                                 f"normalisation); with normalize={self.normalize!r} leave it "
                                 f"None")
            if not torch.is_tensor(masks_weight) or masks_weight.dim() != 1 \
                    or masks_weight.numel() > M:
                raise ValueError(f"{where}: masks_weight must be a 1-D tensor of at most M={M} "
                                 f"rows, got {tuple(getattr(masks_weight, 'shape', ()))}")
            w_M = torch.zeros(M, dtype=wdt, device=s.device)
            w_M[:masks_weight.numel()] = masks_weight.to(device=s.device, dtype=wdt) / B
        if valid_M is not None:
            w_M = torch.where(valid_M, w_M, torch.zeros((), dtype=wdt, device=s.device))
        if teacher_temp is None:  # DINOv2's call: the teacher rows are target distributions
            teacher_TK, tau_t = _log_targets(t), 1.0
            c_K = teacher_TK.new_zeros(K)
        else:
            teacher_TK, tau_t = t.detach(), float(teacher_temp)
            if self.center_mode == "ema":
                self.apply_center_update()
                c_K = self.center.to(t.device)
            else:
                c_K = sinkhorn_knopp_center(teacher_TK, tau_t, self.sinkhorn_iterations,
                                            row_valid_T=valid_M)
        return soft_ce(s, teacher_TK, _identity_pairs(M, s.device), w_M.view(M, 1), c_K,
                       self.student_temp, tau_t, backend=self.backend,
                       check_finite=self.check_finite)

    # ---- the centre (DINOv2's asynchronous update, NaN-safe) -----------------------------------
    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor,
                      n_masked_patches: Union[int, torch.Tensor, None] = None) -> None:
        """Start the update toward the mean teacher logits: ``[G, n, K]`` (DINOv2 passes the
        masked rows as ``[1, n, K]``; a 2-D ``[n, K]`` is one group) -> the mean over n of each
        group, then over groups and ranks. ``n_masked_patches``: only rows below it count
        (padding; 2-D input or one group). Applied by the next ``apply_center_update``."""
        x = teacher_patch_tokens.detach()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.patch_out_dim:
            raise ValueError(f"DINOv2PatchLoss.update_center: teacher_patch_tokens must be "
                             f"[G, n, K={self.patch_out_dim}] or [n, K], got "
                             f"{tuple(teacher_patch_tokens.shape)}")
        G, n, K = x.shape
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        valid = _n_valid_rows(n_masked_patches, n, x.device)
        if valid is None:
            stat = _mean_stat(teacher_col_sum(x.reshape(G * n, K)).to(cdt), n, float(G))
        else:
            if G != 1:
                raise ValueError("DINOv2PatchLoss.update_center: n_masked_patches needs a "
                                 "single group ([n, K] or [1, n, K])")
            sum_K = (x[0].to(cdt) * valid[:, None].to(cdt)).sum(dim=0)
            stat = _mean_stat(sum_K, valid.sum(), 1.0)
        self.updated = False
        self.async_batch_center = stat
        self.reduce_handle = (dist.all_reduce(stat, async_op=True) if get_world_size() > 1
                              else None)

    reduce_center_update = update_center  # DINOv2's name for the same step

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a pending update (waits for its all-reduce)."""
        if self.updated:
            return
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
        _ema_from_stat(self.center, self.async_batch_center.to(self.center.device),
                       self.center_momentum)
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None
