"""VOC 2012: DeepLab-v2 ResNet-101 + ASPP with hierarchical multi-scale attention
(Tao, Sapra and Catanzaro 2020): `voc_r101_s3`'s recipe, trained on scales {0.5, 1},
chained at inference over {0.5, 1, 2}. The alpha head (conv3x3 256 -> conv3x3 256 ->
conv1x1 -> sigmoid, shared by the branches) learns at the new layers' 10x rate.

choice: the loss and the merge resolution are `voc_r101_s3`'s, so that this row differs
from the attention rows in the merge alone: the merged map plus each scale's own map
(weight 1, labels shrunk to the branch), merged at output stride 8. NVIDIA's code
(NVIDIA/semantic-segmentation, network/ocrnet.py MscaleOCR.two_scale_forward,
config.py) does otherwise: it upsamples each scale's logits to the input size before
merging; the per-scale losses weigh LOSS.SUPERVISED_MSCALE_WT (0 by default, 0.05 in
its Cityscapes training scripts), on logits at the input size; and an auxiliary loss
of weight LOSS.OCR_ALPHA = 0.4 on OCR's auxiliary head, merged by the same attention.
DeepLab-v2's ASPP model has no auxiliary head, so that term has nothing to apply to
here. docs/recipes.md gives the comparison.
"""
from scaleattn import config


def get_config():
    c = config.recipe("voc_r101_s3")
    c.name = "voc_r101_hier"
    c.model.merge = "hierarchical"
    c.model.scales = (0.5, 1.0)                    # NVIDIA: trained on {0.5, 1}
    c.model.inference_scales = (0.5, 1.0, 2.0)     # NVIDIA: n_scales 0.5,1.0,2.0
    c.model.alpha_width = 256                      # NVIDIA make_attn_head: 256-wide
    # choice: per-scale losses at weight 1 on each branch's map (NVIDIA: 0 or 0.05, at
    # the input size); merge at output stride 8 (NVIDIA: at the input size). See above.
    c.loss.extra_supervision = True
    c.loss.scale_loss_size = "branch"
    return c
