"""Demo (generated scale_shapes data, CPU): merge="avg"."""
from scaleattn import config


def get_config():
    return config.demo_config(merge="avg")
