"""VOC 2012, voc_avg: the paper's setting with merge="avg"."""
from scaleattn import config


def get_config():
    return config.voc_config(merge="avg")
