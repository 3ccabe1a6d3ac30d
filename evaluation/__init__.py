"""Every metric of the toolkit: COCO mask/box AP and AR (`coco_eval`), CorLoc (`corloc`), and the
confusion-matrix mIoU and clustering ACC/NMI/ARI with their cluster-to-class matching (`metrics`).
This package imports only utils/; every stage and the orchestration layer import it."""
