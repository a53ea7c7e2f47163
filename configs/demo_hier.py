"""Demo: `demo`'s recipe with hierarchical multi-scale attention (Tao, Sapra and
Catanzaro 2020) instead of the softmax over scales: trained on {1, 0.5}, run at
inference on `model.inference_scales` (() = the training scales; e.g.
--config.model.inference_scales='(0.25,0.5,1.0)' in --mode=eval, no retraining)."""
from scaleattn import config


def get_config():
    c = config.recipe("demo")
    c.name = "demo_hier"
    c.model.merge = "hierarchical"
    c.model.alpha_width = 256           # x model.width (1/8): 32 channels
    return c
