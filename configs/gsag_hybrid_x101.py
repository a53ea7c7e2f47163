"""VOC 2012: GSAG hybrid head on resnext101_32x8d, OHEM (see scaleattn.config.gsag_config)."""
from scaleattn import config


def get_config():
    return config.gsag_config(variant="hybrid", backbone="resnext101_32x8d")
