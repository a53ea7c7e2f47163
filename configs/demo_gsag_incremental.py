"""Demo: the GSAG incremental head, `demo_gsag_hybrid`'s recipe.

Head: the key layer and the query layer (pointwise self-attention).

Loss: plain softmax cross-entropy on logits upsampled to the label size, as in
`gsag_incremental_r101`; OHEM is ``--config.loss.type=ohem``.
"""
from scaleattn import config


def get_config():
    c = config.recipe("demo_gsag_hybrid")
    c.name = "demo_gsag_incremental"
    c.model.gsag_variant = "incremental"
    c.loss.type = "ce"                    # OHEM: --config.loss.type=ohem
    return c
