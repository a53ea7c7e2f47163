"""Demo (generated scale_shapes data, CPU): scales=(1.0,)."""
from scaleattn import config


def get_config():
    return config.demo_config(scales=(1.0,))
