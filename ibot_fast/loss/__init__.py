"""The iBOT loss stack, layer by layer (each module imports only the layers below it).

=============================  =================================================================
``ibot_fast.kernels.soft_ce``  the op: ``soft_ce`` / ``soft_ce_linear``, weighted, centred,
                               temperature-scaled soft-target cross-entropy over row pairs
``loss/pairs.py``              the op's inputs: ``cls_pairs``, ``masked_patch_rows``,
                               ``pairs_to_table``
``loss/sinkhorn.py``           Sinkhorn-Knopp centring: ``sinkhorn_knopp_center`` (for the op),
                               ``sinkhorn_knopp_targets`` (dense)
``loss/common.py``             ``IBOTLossBase``: arguments, centres, temperature schedules and
                               input checks shared by the two modules below
``loss/reference.py``          ``IBOTLossReference``: dense, eager, line by line (the maths and
                               the ground truth)
``loss/ibot.py``               ``IBOTLoss``: the same module on the fused op (the trainer's)
``loss/compat.py``             ``IBOTPatchLoss`` (LightlySSL) and ``DINOv2PatchLoss`` (DINOv2)
=============================  =================================================================
"""
from ibot_fast.loss.common import CENTERINGS, IBOTLossBase
from ibot_fast.loss.ibot import LOSS_BACKENDS, IBOTLoss
from ibot_fast.loss.pairs import cls_pairs, masked_patch_rows, pairs_to_table
from ibot_fast.loss.reference import IBOTLossReference
from ibot_fast.loss.sinkhorn import sinkhorn_knopp_center, sinkhorn_knopp_targets
from ibot_fast.loss.compat import (PATCH_NORMS, DINOv2PatchLoss, IBOTPatchLoss,
                                   dense_row_weights, masked_row_weights)

__all__ = ["IBOTLoss", "IBOTLossReference", "IBOTLossBase", "LOSS_BACKENDS", "CENTERINGS",
           "masked_patch_rows", "cls_pairs", "pairs_to_table", "sinkhorn_knopp_targets",
           "sinkhorn_knopp_center", "IBOTPatchLoss", "DINOv2PatchLoss", "PATCH_NORMS",
           "masked_row_weights", "dense_row_weights"]
