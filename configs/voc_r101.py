"""VOC 2012: DeepLab-v2 ResNet-101 + ASPP, scales {1, 0.75, 0.5}, attention merge,
extra supervision; DeepLab-v2's recipe (its "+Aug" row: random rescaling 0.5-1.5).

DeepLab-v2 (its paper and public prototxts): ImageNet ResNet-101 with frozen batch
norm, output stride 8, ASPP-L (rates 6, 12, 18, 24) at 10x learning rate (biases 20x),
SGD momentum 0.9, weight decay 5e-4, poly policy (power 0.9), base LR 2.5e-4,
batch 10, 20,000 iterations, crop 321, random rescale 0.5-1.5 + mirror.

Variant `hier` (``--config=configs/voc_r101.py:hier``): hierarchical multi-scale
attention (Tao, Sapra and Catanzaro 2020), trained on scales {0.5, 1}, chained at
inference over {0.5, 1, 2}. The alpha head (conv3x3 256 -> conv3x3 256 -> conv1x1 ->
sigmoid, shared by the branches) learns at the new layers' 10x rate.
"""
from scaleattn import config

VARIANTS = {
    "s3": {},
    "hier": {"model.merge": "hierarchical", "model.scales": (0.5, 1.0),
             "model.inference_scales": (0.5, 1.0, 2.0), "model.alpha_width": 256},
}

AXES = (VARIANTS,)  # get_config's choices: one name of each, comma-separated


def get_config(arg=None):
    c = config.base_config()
    c.seed = 0

    c.data.name = "voc2012"
    c.data.train_split, c.data.eval_split = "train_aug", "val"
    c.data.crop_size = 321
    c.data.scale_range = (0.5, 1.5)
    c.data.flip = True
    c.data.mean, c.data.std = config.IMAGENET_MEAN, config.IMAGENET_STD
    c.data.eval_size = 513

    c.model.backbone, c.model.head = "resnet101", "aspp_v2"
    c.model.num_classes = 21
    c.model.output_stride = 8
    c.model.aspp_rates = (6, 12, 18, 24)
    c.model.bn_mode = "frozen"
    c.model.scales = (1.0, 0.75, 0.5)
    c.model.merge = "attention"
    c.model.attention_width, c.model.attention_dropout = 512, 0.5
    c.model.init_from = "imagenet"      # converted ResNet-101 ImageNet weights (docs/getting_started.md)

    c.loss.extra_supervision = True
    c.loss.scale_loss_size = "branch"
    c.loss.label_resize = "nearest"
    c.loss.type = "ce"

    c.batch_size = 10
    c.optim.base_lr = 2.5e-4
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.schedule, c.optim.poly_power = "poly", 0.9
    c.optim.new_layer_lr_mult = 10.0    # ASPP and the attention head
    c.optim.new_layer_patterns = ("aspp", "attention", "alpha")
    c.optim.bias_lr_mult = 2.0

    c.train.steps = 20000
    c.train.eval_every = 5000
    c.train.checkpoint_every = 2000
    return config.variant(c, arg, AXES, "voc_r101")
