"""Test-made data shared by the tests and the benchmarks (never imported by the toolkit itself):
synthetic_shapes (a small instance dataset of rectangles and ellipses), coco_perturb (predictions made
from COCO ground truth by jittering it). Import them as `tests.helpers.<module>` from the repository root."""
