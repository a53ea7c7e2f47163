"""VOC 2012, the paper's main model: DeepLab-LargeFOV (VGG16), scales {1, 0.75, 0.5},
attention merge, extra supervision. The recipe of the Attention-to-Scale paper.

Every value that defines this row is set here; the other VGG16 rows are its variants
(`VARIANTS`: ``--config=configs/voc.py:s2``, `baseline`, `avg`, `max`, `s3_noextra`),
which change only what defines them. Sources (see docs/design.md, "Attention to Scale"):

* the attention paper: VGG16 initialised from ImageNet, all scales and the attention
  head trained jointly; SGD, mini-batch 30, base LR 1e-3 divided by 10 after 2,000
  iterations, momentum 0.9, weight decay 5e-4;
* DeepLab-LargeFOV (its base and public solver/prototxts): 6,000 iterations with the
  step policy, random crop 321 (padded with the mean pixel / label 255) and horizontal
  mirror, no random rescaling; biases at twice their layer's learning rate and no
  weight decay; the new classifier (fc8) at 10x, its bias 20x.

Not found in any source: the attention paper's total iterations and crop; we use
DeepLab-LargeFOV's (6,000 and 321).
"""
from scaleattn import config

VARIANTS = {
    "s3": {},
    "s2": {"model.scales": (1.0, 0.75)},
    # single-scale DeepLab-LargeFOV: no merge, no extra supervision (one branch, one loss)
    "baseline": {"model.scales": (1.0,), "loss.extra_supervision": False},
    "avg": {"model.merge": "avg"},           # average pooling over the three scales
    "max": {"model.merge": "max"},           # max pooling over the three scales
    "s3_noextra": {"loss.extra_supervision": False},  # one loss, on the merged map
}

AXES = (VARIANTS,)  # get_config's choices: one name of each, comma-separated


def get_config(arg=None):
    c = config.base_config()
    c.seed = 0

    # Data: VOC 2012 train_aug (10,582 images), evaluated on val.
    c.data.name = "voc2012"
    c.data.train_split, c.data.eval_split = "train_aug", "val"
    c.data.crop_size = 321
    c.data.scale_range = (1.0, 1.0)     # no random rescaling (a later recipe's augmentation)
    c.data.flip = True
    c.data.mean, c.data.std = config.IMAGENET_MEAN, config.IMAGENET_STD
    c.data.eval_size = 513

    # Model: DeepLab-LargeFOV on VGG16 at output stride 8, shared over three scales.
    c.model.backbone, c.model.head = "vgg16", "largefov"
    c.model.num_classes = 21
    c.model.fc6_dilation = 12
    c.model.dropout = 0.5
    c.model.scales = (1.0, 0.75, 0.5)
    c.model.merge = "attention"
    c.model.attention_width, c.model.attention_dropout = 512, 0.5
    c.model.init_from = "imagenet"      # converted VGG16 ImageNet weights (docs/getting_started.md)

    # Loss: CE on the merged map + one CE per scale on that branch's own map.
    c.loss.extra_supervision = True
    c.loss.scale_loss_size = "branch"
    c.loss.label_resize = "nearest"
    c.loss.type = "ce"

    # Optimisation: Caffe SGD, step policy.
    c.batch_size = 30
    c.optim.base_lr = 1e-3
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.step_size, c.optim.step_factor = 2000, 0.1
    c.optim.new_layer_lr_mult = 10.0    # fc8 and the attention head
    c.optim.new_layer_patterns = ("fc8", "attention", "alpha")
    c.optim.bias_lr_mult = 2.0          # Caffe lr_mult 2 / decay_mult 0 on biases

    c.train.steps = 6000
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    return config.variant(c, arg, AXES, "voc")
