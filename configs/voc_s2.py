"""VOC 2012: `voc_s3`'s recipe with two scales, {1, 0.75}."""
from scaleattn import config


def get_config():
    c = config.recipe("voc_s3")
    c.name = "voc_s2"
    c.model.scales = (1.0, 0.75)
    return c
