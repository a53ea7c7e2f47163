"""VOC 2012: `voc_s3`'s recipe with average pooling over the three scales."""
from scaleattn import config


def get_config():
    c = config.recipe("voc_s3")
    c.name = "voc_avg"
    c.model.merge = "avg"
    return c
