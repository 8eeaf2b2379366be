"""Alias of ``ibot_fast.loss.compat`` (the LightlySSL and DINOv2 patch-loss adapters), kept so
``from ibot_fast.adapters import IBOTPatchLoss`` goes on working."""
from ibot_fast.loss.compat import (PATCH_NORMS, DINOv2PatchLoss, IBOTPatchLoss,  # noqa: F401
                                   __all__, dense_row_weights, masked_row_weights)
