"""Backbone, projection head and the student/teacher wrapper."""
from attmask.models.head import IBOTHead
from attmask.models.vit import MaskedViT, ViTOutput, build_backbone
from attmask.models.wrapper import MultiCropNet

__all__ = ["IBOTHead", "MaskedViT", "MultiCropNet", "ViTOutput", "build_backbone"]
