"""VOC 2012: DeepLab-v2 ResNet-101 + ASPP with hierarchical multi-scale attention
(Tao, Sapra and Catanzaro 2020): `voc_r101_s3`'s recipe, trained on scales {0.5, 1},
chained at inference over {0.5, 1, 2}. The alpha head (conv3x3 256 -> conv3x3 256 ->
conv1x1 -> sigmoid, shared by the branches) learns at the new layers' 10x rate."""
from scaleattn import config


def get_config():
    c = config.recipe("voc_r101_s3")
    c.name = "voc_r101_hier"
    c.model.merge = "hierarchical"
    c.model.scales = (0.5, 1.0)
    c.model.inference_scales = (0.5, 1.0, 2.0)
    c.model.alpha_width = 256
    return c
