"""Demo (generated scale_shapes data, CPU): GSAG hybrid head on a tiny ResNet-50 layout."""
from scaleattn import config


def get_config():
    return config.demo_gsag_config(variant="hybrid")
