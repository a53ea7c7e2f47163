"""VOC 2012: `voc_s3`'s recipe with two scales, {1, 0.5}: the attention paper's
two-scale rows (Chen et al., CVPR 2016, the PASCAL VOC 2012 table: "scales = {1, 0.5}").
"""
from scaleattn import config


def get_config():
    c = config.recipe("voc_s3")
    c.name = "voc_s2"
    c.model.scales = (1.0, 0.5)        # the paper's two-scale rows
    return c
