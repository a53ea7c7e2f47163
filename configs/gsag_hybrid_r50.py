"""VOC 2012: the GSAG hybrid head on ResNet-50, with OHEM (the write-up's best
model): `gsag_hybrid_r101`'s recipe with another backbone."""
from scaleattn import config


def get_config():
    c = config.recipe("gsag_hybrid_r101")
    c.name = "gsag_hybrid_r50"
    c.model.backbone = "resnet50"
    return c
