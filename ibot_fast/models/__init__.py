"""Backbone, projection head and the multi-crop wrapper of iBOT."""
from ibot_fast.models.head import IBOTHead, WeightNormLinear
from ibot_fast.models.swin import SWIN_ARCHS, SwinTransformer, build_swin, is_swin
from ibot_fast.models.vit import ARCHS, VisionTransformer, build_vit
from ibot_fast.models.wrapper import MultiCropWrapper, build_backbone, build_ibot_models

__all__ = ["VisionTransformer", "build_vit", "ARCHS", "IBOTHead", "WeightNormLinear",
           "MultiCropWrapper", "build_ibot_models", "SwinTransformer", "build_swin",
           "SWIN_ARCHS", "is_swin", "build_backbone"]
