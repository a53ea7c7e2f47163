"""VOC 2012, voc_baseline: the paper's setting with scales=(1.0,)."""
from scaleattn import config


def get_config():
    return config.voc_config(scales=(1.0,))
