"""VOC 2012: the GSAG incremental head on ResNeXt-101 32x8d, `gsag_hybrid_r101`'s recipe.

Head: the key layer and the query layer (pointwise self-attention).
Loss: plain softmax cross-entropy on logits upsampled to the label size. The
write-up reports OHEM-softmax only with the hybrid head; here OHEM is one switch
away, ``--config.loss.type=ohem`` (the recipe's threshold 0.7 and min_kept
100,000 per image, at the label's resolution).
"""
from scaleattn import config


def get_config():
    c = config.recipe("gsag_hybrid_r101")
    c.name = "gsag_incremental_x101"
    c.model.backbone = "resnext101_32x8d"
    c.model.gsag_variant = "incremental"
    c.loss.type = "ce"                  # OHEM: --config.loss.type=ohem
    return c
