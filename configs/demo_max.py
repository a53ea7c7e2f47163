"""Demo (generated scale_shapes data, CPU): merge="max"."""
from scaleattn import config


def get_config():
    return config.demo_config(merge="max")
