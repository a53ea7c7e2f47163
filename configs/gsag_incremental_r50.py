"""VOC 2012: GSAG incremental head on resnet50, OHEM (see scaleattn.config.gsag_config)."""
from scaleattn import config


def get_config():
    return config.gsag_config(variant="incremental", backbone="resnet50")
