"""ibot_fast: fast, exact iBOT pre-training of Vision Transformers."""
__version__ = "0.1.0"

from ibot_fast.loss import IBOTLoss  # noqa: E402

__all__ = ["IBOTLoss", "__version__"]
