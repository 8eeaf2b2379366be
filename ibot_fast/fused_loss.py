"""Old import path of the soft-target cross-entropy op and its loss-side helpers.

The op -- ``soft_ce``, ``soft_ce_linear``, ``teacher_col_sum``, ``resolve_backend`` and its
back ends -- lives in ``ibot_fast.kernels.soft_ce`` (the bottom of the import graph);
Sinkhorn-Knopp centring in ``ibot_fast.loss.sinkhorn``; flat pair lists in
``ibot_fast.loss.pairs``. This module re-exports them so ``from ibot_fast.fused_loss import
soft_ce`` keeps working.
"""
from ibot_fast.kernels.soft_ce import (BACKENDS, resolve_backend, soft_ce, soft_ce_linear,
                                       teacher_col_sum)
from ibot_fast.loss.pairs import pairs_to_table
from ibot_fast.loss.sinkhorn import sinkhorn_knopp_center

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum", "sinkhorn_knopp_center",
           "pairs_to_table", "resolve_backend", "BACKENDS"]
