"""Demo: `demo`'s recipe at scale 1 only (no merge; one branch, one loss)."""
from scaleattn import config


def get_config():
    c = config.recipe("demo")
    c.name = "demo_single"
    c.model.scales = (1.0,)
    c.loss.extra_supervision = False
    return c
