"""VOC 2012: GSAG hybrid head on resnet50, OHEM (see scaleattn.config.gsag_config)."""
from scaleattn import config


def get_config():
    return config.gsag_config(variant="hybrid", backbone="resnet50")
