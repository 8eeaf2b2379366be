"""Which rows pair with which, with what weight: the inputs of the soft-target CE op.

``ibot_fast.kernels.soft_ce`` takes its pairs student-major: ``partner_MP[i, p]`` is the
teacher row of the p-th pair of student row i and ``weight_MP[i, p]`` its weight (0: no pair).
Here are the tables the iBOT loss builds from its inputs:

* ``cls_pairs`` -- the [CLS] term: student crop v pairs with every teacher global crop q != v;
* ``masked_patch_rows`` -- the patch term: the masked tokens of the global crops as rows of the
  crop-major token axis, with the reference's per-image weights (each row pairs with itself);
* ``pairs_to_table`` -- any flat list of (student row, teacher row, weight) as the two tables.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ibot_fast.masking import patch_token_weights

__all__ = ["cls_pairs", "masked_patch_rows", "pairs_to_table"]


def cls_pairs(ngcrops: int, ncrops: int, B: int, device=None, dtype=torch.float32,
              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Partner table of the [CLS] term: student row ``v*B + b`` (crop v of ``ncrops``, image b)
    pairs with the teacher rows ``q*B + b``, ``q < ngcrops``, with weight
    ``scale / ((ngcrops*ncrops - ngcrops) * B)`` when ``q != v`` and 0 for the same view.
    Returns ``(partner [ncrops*B, ngcrops] int64, weight [ncrops*B, ngcrops] dtype)``; with
    ``scale = lambda1`` the weighted sum is the reference's [CLS] loss."""
    ng, nc = ngcrops, ncrops
    v = torch.arange(nc, device=device).view(nc, 1, 1)
    b = torch.arange(B, device=device).view(1, B, 1)
    q = torch.arange(ng, device=device).view(1, 1, ng)
    partner_MP = (q * B + b).expand(nc, B, ng).reshape(nc * B, ng)
    weight_MP = (v != q).to(dtype).expand(nc, B, ng).reshape(nc * B, ng)
    return partner_MP, weight_MP * (scale / ((ng * nc - ng) * B))


def masked_patch_rows(student_mask: Sequence[torch.Tensor], ngcrops: int,
                      max_rows: Optional[int] = None, device=None):
    """The masked patch tokens of the global crops, as rows of the crop-major token axis.

    Returns ``(row_idx_M, weight_M)``: ``row_idx_M`` (int64) indexes the flattened
    ``[ngcrops*B*N]`` token axis (row ``(q*B + b)*N + n``, the layout of
    ``student_patch.reshape(-1, K2)``), ``weight_M`` (fp32) is ``1 / (ngcrops * B *
    max(count_b, 1))`` for a masked token of image b. These are the reference's per-image mean
    over masked tokens, then the mean over all B images (an image with no masked token counts
    as 0), then the mean over the global crops -- the weights ``IBOTLoss.forward_selected``
    expects.

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
    if not torch.is_tensor(weight_R) or not weight_R.is_floating_point() or weight_R.dim() != 1:
        raise ValueError(f"weight_R must be a 1-D floating tensor, got "
                         f"{getattr(weight_R, 'dtype', type(weight_R).__name__)} "
                         f"{tuple(getattr(weight_R, 'shape', ()))}")
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
