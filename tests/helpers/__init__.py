"""Test-made data shared by the tests and the benchmarks (never imported by the toolkit itself):
synthetic_shapes (a small instance dataset of rectangles and ellipses), coco_perturb (predictions made
from COCO ground truth by jittering it); and script_probe (runs scripts' --help or dry parses of their
command lines in one interpreter, for the entry-point and docs-command tests). Import them as `tests.helpers.<module>` from the repository root."""
