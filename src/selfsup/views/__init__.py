"""Views: the augmentation settings (ViewConfig, presets) and the batched, on-device augmentation that makes two views of each image."""
from selfsup.views.augment import BatchAugment, save_view_grid, two_views
from selfsup.views.config import ViewConfig

__all__ = ["ViewConfig", "BatchAugment", "two_views", "save_view_grid"]
