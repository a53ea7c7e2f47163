"""VOC 2012: the GSAG hybrid head on ResNeXt-101 32x8d, with OHEM (the write-up's best
model): `gsag_hybrid_r101`'s recipe with another backbone."""
from scaleattn import config


def get_config():
    c = config.recipe("gsag_hybrid_r101")
    c.name = "gsag_hybrid_x101"
    c.model.backbone = "resnext101_32x8d"
    return c
