"""VOC 2012: the GSAG basic head on ResNet-50, `gsag_hybrid_r101`'s recipe.

Head: the key layer only (conv3x3-BN-ReLU, then the classifier).
Loss: plain softmax cross-entropy on logits upsampled to the label size. The
write-up reports OHEM-softmax only with the hybrid head; here OHEM is one switch
away, ``--config.loss.type=ohem`` (the recipe's threshold 0.7 and min_kept
100,000 per image, at the label's resolution).
"""
from scaleattn import config


def get_config():
    c = config.recipe("gsag_hybrid_r101")
    c.name = "gsag_basic_r50"
    c.model.backbone = "resnet50"
    c.model.gsag_variant = "basic"
    c.loss.type = "ce"                  # OHEM: --config.loss.type=ohem
    return c
