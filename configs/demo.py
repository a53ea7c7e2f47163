"""Demo (generated scale_shapes data, CPU): attention over scales {1, 0.5}."""
from scaleattn import config


def get_config():
    return config.demo_config()
