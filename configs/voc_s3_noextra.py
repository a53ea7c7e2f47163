"""VOC 2012: `voc_s3`'s recipe without extra supervision (one loss, on the merged map)."""
from scaleattn import config


def get_config():
    c = config.recipe("voc_s3")
    c.name = "voc_s3_noextra"
    c.loss.extra_supervision = False
    return c
