"""VOC 2012, voc_s3_noextra: the paper's setting with extra_supervision=False."""
from scaleattn import config


def get_config():
    return config.voc_config(extra_supervision=False)
