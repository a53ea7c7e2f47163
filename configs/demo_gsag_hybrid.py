"""Demo: the GSAG hybrid head with OHEM, on the generated `scale_shapes` set, on a CPU.

`demo`'s recipe (data, optimiser, schedule; see configs/demo.py) with the network
swapped for the GSAG one at demo size: a ResNet-50 layout at 1/8 width with one block
per stage (output stride 8), trained batch norm, the GSAG head at 1/8 width (64
channels) with a 5x5 window, one scale. Loss as `gsag_hybrid_r101`'s: OHEM-softmax on
logits upsampled to the label size, threshold 0.7, min_kept 6,000 per image (37% of a
128x128 crop, about the share 100,000 is of a 513x513 crop).
`demo_gsag_basic` and `demo_gsag_incremental` change only the head and, as their VOC
configs do, train with plain cross-entropy.
"""
from scaleattn import config


def get_config():
    c = config.recipe("demo")
    c.name = "demo_gsag_hybrid"

    c.model.backbone, c.model.head = "resnet50", "gsag"
    c.model.width = 0.125
    c.model.depth = (1, 1, 1, 1)          # one bottleneck block per stage
    c.model.output_stride = 8
    c.model.bn_mode, c.model.sync_bn = "train", True
    c.model.gsag_variant = "hybrid"
    c.model.gsag_channels = 512           # x width: 64
    c.model.gsag_window = 5
    c.model.gsag_global_attention = "pooled"
    c.model.gsag_dropout = 0.0
    c.model.scales = (1.0,)

    c.loss.extra_supervision = False      # one scale, one loss
    c.loss.label_resize = "upsample_logits"
    c.loss.type = "ohem"
    c.loss.ohem_threshold = 0.7
    c.loss.ohem_min_kept = 6_000          # per image, at the label's resolution

    c.optim.new_layer_patterns = ("gsag",)  # the head at new_layer_lr_mult (10x)
    return c
