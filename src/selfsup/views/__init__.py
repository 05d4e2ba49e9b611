"""Views: the augmentation settings (ViewConfig, presets) and the batched, on-device augmentation that makes two views of each image."""
