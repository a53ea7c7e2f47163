"""VOC 2012: GSAG hybrid head on ResNet-101 inside Attention to Scale (3 scales)."""
from scaleattn import config


def get_config():
    return config.gsag_config(variant="hybrid", backbone="resnet101",
                              scales=(1.0, 0.75, 0.5), merge="attention")
