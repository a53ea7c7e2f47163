"""VOC 2012, voc_max: the paper's setting with merge="max"."""
from scaleattn import config


def get_config():
    return config.voc_config(merge="max")
