"""ibot_fast: fast, exact iBOT pre-training of Vision Transformers."""
__version__ = "0.1.0"

from ibot_fast.loss import DINOv2PatchLoss, IBOTLoss, IBOTPatchLoss  # noqa: E402

__all__ = ["IBOTLoss", "IBOTPatchLoss", "DINOv2PatchLoss", "__version__"]
