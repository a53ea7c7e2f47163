"""VOC 2012: the GSAG heads on dilated ResNets, ``--config=configs/gsag.py:HEAD,BACKBONE``.

The default, ``hybrid,r101``, is the write-up's best model: the hybrid head on
ResNet-101, trained with OHEM-softmax. Every value that defines the GSAG rows is set
here; the variants change only the head (`HEADS`), the backbone (`BACKBONES`) or the
scales (`SCALES`), e.g. ``configs/gsag.py:incremental,r50`` (named gsag_incremental_r50).

Heads: `basic` is the key layer only (conv3x3-BN-ReLU, then the classifier);
`incremental` adds the query layer (pointwise self-attention); `hybrid` adds the
attention-mean-pool layer. Basic and incremental train with plain softmax
cross-entropy on logits upsampled to the label size: the write-up reports
OHEM-softmax only with the hybrid head; for them OHEM is one switch away,
``--config.loss.type=ohem`` (the recipe's threshold 0.7 and min_kept 100,000 per
image, at the label's resolution). `s3` puts the network inside Attention to Scale:
shared over scales {1, 0.75, 0.5}, merged by the attention head, with one extra loss
(OHEM for the hybrid head) per scale on that branch's own map (upsampled to the label size).

The GSAG write-up gives the model (`scaleattn/models/self_attention.py` maps it
sentence by sentence), the data (VOC 2012, mIoU), the backbones and "hybrid + OHEM-
softmax is best", but no training schedule. This is a composite of the dilated-ResNet
recipes of its time (DeepLabv3, PSPNet, OCNet), none of them the write-up's own:
ImageNet backbone at output stride 8, trained and synchronised batch norm, crop 513
with random rescale 0.5-2.0 and mirror, batch 8, SGD momentum 0.9, weight decay 1e-4,
base LR 0.01 with the poly policy (power 0.9) and 10x on the new head, 30,000 steps
on train_aug. Each such value is marked ``# choice:`` below (docs/recipes.md lists
them all); the head's sizes are choices too (the write-up gives none).

OHEM as OCNet / PSPNet-style OHEM-softmax does it: the logits are upsampled (bilinear)
to the label's size and the loss trains on the pixels whose true-class probability is
below 0.7, but on at least the 100,000 hardest of each image (38% of a 513x513
crop), mmsegmentation's OHEMPixelSampler values (thresh=0.7, min_kept=100000 per
image). Counted per image, the kept pixels do not depend on the devices or
`parallel.mode`. Early on every pixel is below 0.7 and all are trained on; the
mining starts as the model becomes confident on the easy pixels.
"""
from scaleattn import config

HEADS = {
    "hybrid": {},
    "basic": {"model.gsag_variant": "basic", "loss.type": "ce"},
    "incremental": {"model.gsag_variant": "incremental", "loss.type": "ce"},
}
BACKBONES = {
    "r101": {},
    "r50": {"model.backbone": "resnet50"},
    "x101": {"model.backbone": "resnext101_32x8d"},
}
SCALES = {
    "": {},
    "s3": {"model.scales": (1.0, 0.75, 0.5), "model.merge": "attention",
           "model.attention_width": 512,      # the attention paper's head
           "model.attention_dropout": 0.5,    # choice: no source gives it (as voc.py)
           "loss.extra_supervision": True, "loss.scale_loss_size": "branch"},
}

AXES = (HEADS, BACKBONES, SCALES)  # get_config's choices: one name of each, comma-separated


def get_config(arg=None):
    c = config.base_config()
    c.seed = 0

    # Data: VOC 2012 train_aug (10,582 images), evaluated on val.
    c.data.name = "voc2012"
    c.data.train_split, c.data.eval_split = "train_aug", "val"
    c.data.crop_size = 513               # choice: DeepLabv3 / OCNet's VOC crop
    c.data.scale_range = (0.5, 2.0)      # choice: DeepLabv3 / PSPNet's random rescale
    c.data.flip = True                   # choice: mirror, as every recipe of the time
    c.data.mean, c.data.std = config.IMAGENET_MEAN, config.IMAGENET_STD  # choice: the
                                         # torchvision backbone's statistics
    c.data.eval_size = 513

    # Model: dilated ResNet-101 (output stride 8) + the GSAG head, one scale.
    c.model.backbone, c.model.head = "resnet101", "gsag"
    c.model.num_classes = 21
    c.model.output_stride = 8            # choice: PSPNet / OCNet's dilated stride 8
    c.model.multi_grid = ()
    c.model.bn_mode, c.model.sync_bn = "train", True  # choice: PSPNet / OCNet's sync BN
    c.model.gsag_variant = "hybrid"      # key + query + attention-mean-pool layers
    c.model.gsag_channels = 512          # choice: the write-up gives no width; OCNet's 512
    c.model.gsag_window = 7              # choice: pointwise attention and local pooling
                                         # window (the write-up gives no size)
    c.model.gsag_global_attention = "pooled"  # one context vector per image (docs/gsag.md, 1.6)
    c.model.gsag_dropout = 0.0           # choice: no dropout (the write-up names none)
    c.model.scales = (1.0,)
    c.model.init_from = "imagenet"       # choice: torchvision's ImageNet ResNet-101

    # Loss: OHEM-softmax on logits upsampled to the label size.
    c.loss.extra_supervision = False     # one scale, one loss
    c.loss.label_resize = "upsample_logits"  # OCNet / PSPNet OHEM: at the label's size
    c.loss.type = "ohem"                 # the write-up: hybrid + OHEM-softmax is best
    c.loss.ohem_threshold = 0.7          # choice: mmsegmentation's OHEMPixelSampler
    c.loss.ohem_min_kept = 100_000       # (thresh 0.7, min_kept 100000 per image); the
                                         # write-up gives no values. At the label's size.

    # Optimisation: SGD, poly policy. choice: all of it (DeepLabv3 / PSPNet / OCNet's
    # values; the write-up gives no schedule).
    c.batch_size = 8
    c.optim.base_lr = 0.01
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.schedule, c.optim.poly_power = "poly", 0.9
    c.optim.new_layer_lr_mult = 10.0     # the GSAG head (and a scale-attention head)
    c.optim.new_layer_patterns = ("gsag", "attention")
    c.optim.bias_lr_mult = 1.0

    c.train.steps = 30000
    c.train.eval_every = 5000
    c.train.checkpoint_every = 2000
    return config.variant(c, arg, AXES, "gsag")
