"""VOC 2012: GSAG incremental head on resnext101_32x8d, OHEM (see scaleattn.config.gsag_config)."""
from scaleattn import config


def get_config():
    return config.gsag_config(variant="incremental", backbone="resnext101_32x8d")
