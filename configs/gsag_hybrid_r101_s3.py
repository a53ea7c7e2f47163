"""VOC 2012: `gsag_hybrid_r101`'s recipe inside Attention to Scale: the GSAG hybrid
network shared over scales {1, 0.75, 0.5}, merged by the attention head, with one
extra OHEM loss per scale on that branch's own map (upsampled to the label size)."""
from scaleattn import config


def get_config():
    c = config.recipe("gsag_hybrid_r101")
    c.name = "gsag_hybrid_r101_s3"
    c.model.scales = (1.0, 0.75, 0.5)
    c.model.merge = "attention"
    c.model.attention_width = 512       # the attention paper's head
    c.model.attention_dropout = 0.5     # choice: no source gives it (as voc_s3)
    c.loss.extra_supervision = True
    c.loss.scale_loss_size = "branch"
    return c
