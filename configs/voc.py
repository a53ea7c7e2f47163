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

Every value below cites its source; a value no source gives is marked ``# choice:``
with the reason (docs/recipes.md lists them all). The two-scale variant `s2` trains on
{1, 0.5}, the attention paper's two-scale rows. The single-scale `baseline` is
DeepLab-LargeFOV itself, so its CRF values (the ones set below) are sourced there:
DeepLab v1's CRF settings for its released DeepLab-LargeFOV, bi_w 4, bi_xy_std 121,
bi_rgb_std 5, pos_w 3, pos_xy_std 3, with its densecrf's row normalisation.
"""
from scaleattn import config

VARIANTS = {
    "s3": {},
    "s2": {"model.scales": (1.0, 0.5)},      # the attention paper's two-scale rows
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

    # Data: VOC 2012 train_aug (10,582 images), evaluated on val (both papers).
    c.data.name = "voc2012"
    c.data.train_split, c.data.eval_split = "train_aug", "val"
    c.data.crop_size = 321              # choice: the attention paper gives no crop;
                                        # DeepLab-LargeFOV's (its train prototxt, crop 321)
    c.data.scale_range = (1.0, 1.0)     # DeepLab-LargeFOV: no random rescaling
    c.data.flip = True                  # DeepLab-LargeFOV train prototxt: mirror
    c.data.mean, c.data.std = config.IMAGENET_MEAN, config.IMAGENET_STD  # choice: what
                                        # the torchvision VGG16 start expects (DeepLab's
                                        # Caffe VGG16 subtracts the BGR mean, no std)
    c.data.eval_size = 513              # DeepLab test prototxts: val images padded to 513

    # Model: DeepLab-LargeFOV on VGG16 at output stride 8, shared over three scales.
    c.model.backbone, c.model.head = "vgg16", "largefov"    # the attention paper
    c.model.num_classes = 21
    c.model.fc6_dilation = 12           # DeepLab-LargeFOV: fc6 3x3, rate 12, 1024 wide
    c.model.dropout = 0.5               # DeepLab-LargeFOV prototxt: fc6/fc7 dropout 0.5
    c.model.scales = (1.0, 0.75, 0.5)   # the attention paper's three-scale rows
    c.model.merge = "attention"
    c.model.attention_width = 512       # the attention paper: 3x3 conv of 512, 1x1 conv
    c.model.attention_dropout = 0.5     # choice: no source gives the attention head's
                                        # dropout; fc6/fc7's 0.5
    c.model.init_from = "imagenet"      # choice: torchvision's VGG16 ImageNet weights
                                        # (DeepLab's Caffe VGG16 cannot be downloaded
                                        # here); docs/getting_started.md converts them

    # Loss: CE on the merged map + one CE per scale on that branch's own map.
    c.loss.extra_supervision = True     # the attention paper's extra supervision
    c.loss.scale_loss_size = "branch"   # the attention paper: ground truth shrunk to each
                                        # branch's output
    c.loss.label_resize = "nearest"     # DeepLab: labels shrunk to the score map (Caffe)
    c.loss.type = "ce"

    # Optimisation: Caffe SGD, step policy (the attention paper's values).
    c.batch_size = 30
    c.optim.base_lr = 1e-3
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.step_size, c.optim.step_factor = 2000, 0.1
    # DeepLab prototxts: fc8 at 10x the base LR, biases at 2x with no weight decay.
    # choice: the attention head (no source gives its rate) as a new layer like fc8:
    # 10x, its biases 20x.
    c.optim.new_layer_lr_mult = 10.0
    c.optim.new_layer_patterns = ("fc8", "attention", "alpha")
    c.optim.bias_lr_mult = 2.0

    c.train.steps = 6000                # choice: the attention paper gives no length;
                                        # DeepLab-LargeFOV's 6,000 iterations
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000

    # Dense CRF (eval.crf). choice: the attention paper gives no CRF values for its
    # model; DeepLab-LargeFOV's (the network it shares over scales; DeepLab v1's list of
    # CRF settings per released model: bi_w 4, bi_xy_std 121, bi_rgb_std 5, pos_w 3,
    # pos_xy_std 3), with its densecrf's row normalisation (the 2011 code). DeepLab
    # searched the values per model on val: --mode=crf_search does that search.
    c.crf.bilateral_weight, c.crf.bilateral_xy_std, c.crf.bilateral_rgb_std = 4.0, 121.0, 5.0
    c.crf.gaussian_weight, c.crf.gaussian_xy_std = 3.0, 3.0
    c.crf.iterations, c.crf.normalization = 10, "row"
    return config.variant(c, arg, AXES, "voc")
