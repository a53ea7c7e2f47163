"""Demo: `demo`'s recipe with average pooling over the scales {1, 0.5}."""
from scaleattn import config


def get_config():
    c = config.recipe("demo")
    c.name = "demo_avg"
    c.model.merge = "avg"
    return c
