"""Shared helpers used by every stage: COCO I/O, images, configs, checkpoints, metrics."""
