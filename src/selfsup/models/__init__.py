"""Models: the backbone registry (BACKBONES, build_backbone), ResNet and its fast paths, SK ResNet, the timm adapter, projection heads, batch-norm sync."""
