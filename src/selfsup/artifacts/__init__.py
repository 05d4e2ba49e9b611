"""Artifacts made from a finished run: export (torchvision / timm / hub folders), embeddings, reports, the Lightning checkpoint reader."""
