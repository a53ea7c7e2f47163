"""VOC 2012: single-scale DeepLab-LargeFOV, `voc_s3`'s recipe at scale 1 only
(no merge, no extra supervision: one branch, one loss)."""
from scaleattn import config


def get_config():
    c = config.recipe("voc_s3")
    c.name = "voc_baseline"
    c.model.scales = (1.0,)
    c.loss.extra_supervision = False
    return c
