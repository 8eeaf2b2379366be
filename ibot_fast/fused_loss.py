r"""Sinkhorn-Knopp centring and flat pair lists for ``soft_ce``, plus the op's old import path.

The op itself -- ``soft_ce``, ``soft_ce_linear``, ``teacher_col_sum``, the back ends and their
checks -- lives in ``ibot_fast.kernels.soft_ce`` (the bottom of the import graph) and is
re-exported here, so ``from ibot_fast.fused_loss import soft_ce`` keeps working.

Sinkhorn-Knopp centring (DINOv2/v3's ``sinkhorn_knopp_teacher``) is a centre too:
``sinkhorn_knopp_center`` (``ibot_fast.loss.sinkhorn``, re-exported here) returns the vector
``c`` for which ``softmax((t - c)/tau_t)`` *is* the Sinkhorn-Knopp target, so ``soft_ce`` fuses
it like the EMA centre. ``pairs_to_table`` (``ibot_fast.loss.pairs``, re-exported here) turns a
flat pair list into the student-major tables.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["soft_ce", "soft_ce_linear", "teacher_col_sum", "sinkhorn_knopp_center",
           "pairs_to_table", "resolve_backend", "BACKENDS"]

# ---- the op (soft_ce, soft_ce_linear, back ends, checks): moved to ibot_fast.kernels.soft_ce --
from ibot_fast.kernels.soft_ce import (  # noqa: E402,F401 - re-exports
    _FLOATS, BACKENDS, _check_center, _check_core, _check_finite, _check_float, _check_inplace,
    _check_pairs, _check_temps, _chunk_terms, _compute_dtype, _default_chunk_rows, _SoftCE,
    _soft_ce_linear_torch, _soft_ce_torch, _SoftCELinear, _temp, _triton_available,
    resolve_backend, soft_ce, soft_ce_linear, teacher_col_sum)


# ---- Sinkhorn-Knopp centring: in the loss package, re-exported here -------------------------
from ibot_fast.loss.sinkhorn import sinkhorn_knopp_center  # noqa: E402,F401


# ---- flat pair lists -> student-major tables: in the loss package, re-exported here ---------
from ibot_fast.loss.pairs import pairs_to_table  # noqa: E402,F401
