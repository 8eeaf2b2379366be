"""Fused kernels, installed as ``ibot_fast.kernels`` (never as a top-level ``kernels`` package:
that name is taken on PyPI). The bottom of the import graph: nothing here imports ``ibot_fast``.

``soft_ce`` -- weighted, centred, temperature-scaled soft-target cross-entropy over row pairs,
with the student gradient computed in the same pass -- and its fused-linear variant
``soft_ce_linear``, in ``ibot_fast.kernels.soft_ce`` (autograd functions, checks, the chunked
PyTorch back end). They dispatch (``backend="auto"|"triton"|"torch"``) to the Triton kernels in
``soft_ce_triton``. ``ema_triton`` holds the flat-buffer EMA kernel. Importing this package does
not import triton, so CPU users without it keep working.

The package attribute ``soft_ce`` is the function, not the submodule of the same name (the
import below binds it after the submodule is loaded): reach the module as
``sys.modules["ibot_fast.kernels.soft_ce"]`` or with ``from ibot_fast.kernels.soft_ce import``.
"""
from .soft_ce import soft_ce, soft_ce_linear, teacher_col_sum

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum"]
