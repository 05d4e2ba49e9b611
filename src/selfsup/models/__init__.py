"""Models: the backbone registry (BACKBONES, build_backbone), ResNet and its fast paths, SK ResNet, the timm adapter, projection heads, batch-norm sync."""
from selfsup.models.backbones import BACKBONES, CPU_DEFAULT_BACKBONE, build_backbone
from selfsup.models.heads import ProjectionHead

__all__ = ["BACKBONES", "CPU_DEFAULT_BACKBONE", "build_backbone", "ProjectionHead"]
