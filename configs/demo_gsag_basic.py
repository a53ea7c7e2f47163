"""Demo: the GSAG basic head, `demo_gsag_hybrid`'s recipe.

Head: the key layer only (conv3x3-BN-ReLU, then the classifier).

Loss: plain softmax cross-entropy on logits upsampled to the label size, as in
`gsag_basic_r101`; OHEM is ``--config.loss.type=ohem``.
"""
from scaleattn import config


def get_config():
    c = config.recipe("demo_gsag_hybrid")
    c.name = "demo_gsag_basic"
    c.model.gsag_variant = "basic"
    c.loss.type = "ce"                    # OHEM: --config.loss.type=ohem
    return c
