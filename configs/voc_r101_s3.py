"""VOC 2012, voc_r101_s3: the paper's setting with backbone="resnet101"."""
from scaleattn import config


def get_config():
    return config.voc_config(backbone="resnet101")
