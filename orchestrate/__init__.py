"""The layer above the stages: the whole pipeline (`pipeline.py`), the PA-mask source (`gen_pa_masks.py`)
and the clustering command (`utils/cluster.py`). Modules here may import every stage package and utils/;
no stage package imports this one."""
