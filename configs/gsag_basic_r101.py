"""VOC 2012: GSAG basic head on resnet101, OHEM (see scaleattn.config.gsag_config)."""
from scaleattn import config


def get_config():
    return config.gsag_config(variant="basic", backbone="resnet101")
