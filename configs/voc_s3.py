"""VOC 2012, voc_s3: the paper's main setting (3 scales, attention, extra supervision)."""
from scaleattn import config


def get_config():
    return config.voc_config()
