"""Demo: `demo`'s attention model without extra supervision (one loss, on the merged map)."""
from scaleattn import config


def get_config():
    c = config.recipe("demo")
    c.name = "demo_noextra"
    c.loss.extra_supervision = False
    return c
