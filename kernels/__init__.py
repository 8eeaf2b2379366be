"""Fused kernels, installed as ``ibot_fast.kernels`` (never as a top-level ``kernels`` package:
that name is taken on PyPI).

``soft_ce`` -- weighted, centred, temperature-scaled soft-target cross-entropy over row pairs,
with the student gradient computed in the same pass -- and its fused-linear variant
``soft_ce_linear``. They dispatch (``backend="auto"|"triton"|"torch"``) to the Triton kernels in
``ibot_fast.kernels.soft_ce_triton`` or to the chunked PyTorch fallback in
``ibot_fast.fused_loss``. (The kernel module is not called ``soft_ce``: importing a submodule of
that name would replace the function ``ibot_fast.kernels.soft_ce`` by the module.) Importing
this package does not import triton, so CPU users without it keep working.
"""
from ibot_fast.fused_loss import soft_ce, soft_ce_linear, teacher_col_sum

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum"]
