"""ibot_fast: fast, exact iBOT pre-training of Vision Transformers."""
__version__ = "0.1.0"

from ibot_fast.loss import IBOTLoss  # noqa: E402
from ibot_fast.adapters import DINOv2PatchLoss, IBOTPatchLoss  # noqa: E402

__all__ = ["IBOTLoss", "IBOTPatchLoss", "DINOv2PatchLoss", "__version__"]
