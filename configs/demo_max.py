"""Demo: `demo`'s recipe with max pooling over the scales {1, 0.5}."""
from scaleattn import config


def get_config():
    c = config.recipe("demo")
    c.name = "demo_max"
    c.model.merge = "max"
    return c
