"""Every metric of the toolkit: COCO mask/box AP and AR (`coco_eval`), CorLoc (`corloc`), and the
confusion-matrix mIoU and clustering ACC/NMI/ARI with their cluster-to-class matching (`metrics`); the
most-confident pick they share (`most_confident`) and the one metric interface, `rows.MetricRow`
(stage, metric, value, against), that each family's rows function returns. A new metric is one module
here plus its test (docs/evaluation.md). This package imports only utils/; every stage and the
orchestration layer import it."""
