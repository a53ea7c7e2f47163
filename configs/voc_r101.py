"""VOC 2012: DeepLab-v2 ResNet-101 + ASPP, scales {1, 0.75, 0.5}, attention merge,
extra supervision; DeepLab-v2's recipe (its "+Aug" row: random rescaling to one of
0.5, 0.75, 1, 1.25, 1.5).

DeepLab-v2 (its paper and public prototxts): ImageNet ResNet-101 with frozen batch
norm, output stride 8, ASPP-L (rates 6, 12, 18, 24) at 10x learning rate (biases 20x),
SGD momentum 0.9, weight decay 5e-4, poly policy (power 0.9), base LR 2.5e-4,
batch 10, 20,000 iterations, crop 321, random rescale + mirror. The same values are
in deeplab-pytorch's DeepLab-v2 reproduction (configs/voc12.yaml: SCALES [0.5, 0.75,
1.0, 1.25, 1.5], batch 5 x iter_size 2, LR 2.5e-4, poly 0.9, 20,000 iterations, crop
321, and the CRF values below). A value no source gives is marked ``# choice:``
(docs/recipes.md lists them all).

Variant `hier` (``--config=configs/voc_r101.py:hier``): hierarchical multi-scale
attention (Tao, Sapra and Catanzaro 2020), trained on scales {0.5, 1}, chained at
inference over {0.5, 1, 2} (NVIDIA's n_scales 0.5,1.0,2.0). The alpha head (conv3x3
256 -> conv3x3 256 -> conv1x1 -> sigmoid, shared by the branches; NVIDIA's
make_attn_head, SEGATTN_BOT_CH 256) learns at the new layers' 10x rate.

choice: `hier` keeps `s3`'s loss and merge resolution, so that it differs from the
attention rows in the merge alone: the merged map plus each scale's own map (weight 1,
labels shrunk to the branch), merged at output stride 8. NVIDIA's code
(NVIDIA/semantic-segmentation, network/ocrnet.py MscaleOCR.two_scale_forward,
config.py) does otherwise: it upsamples each scale's logits to the input size before
merging; the per-scale losses weigh LOSS.SUPERVISED_MSCALE_WT (0 by default, 0.05 in
its Cityscapes training scripts), on logits at the input size; and an auxiliary loss of
weight LOSS.OCR_ALPHA = 0.4 sits on OCR's auxiliary head, merged by the same attention.
DeepLab-v2's ASPP model has no auxiliary head, so that term has nothing to apply to
here. docs/recipes.md gives the comparison.
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
    c.data.crop_size = 321              # DeepLab-v2 prototxts
    c.data.scale_set = (0.5, 0.75, 1.0, 1.25, 1.5)  # DeepLab-v2 "+Aug": one of these
    c.data.scale_range = (0.5, 1.5)     # (unused while scale_set is set: its bounds)
    c.data.flip = True                  # DeepLab-v2 prototxts: mirror
    c.data.mean, c.data.std = config.IMAGENET_MEAN, config.IMAGENET_STD  # choice: what
                                        # the torchvision ResNet-101 start expects
    c.data.eval_size = 513              # DeepLab-v2 test prototxts: padded to 513

    c.model.backbone, c.model.head = "resnet101", "aspp_v2"
    c.model.num_classes = 21
    c.model.output_stride = 8
    c.model.aspp_rates = (6, 12, 18, 24)
    c.model.bn_mode = "frozen"
    c.model.scales = (1.0, 0.75, 0.5)   # DeepLab-v2's MSC scales and the attention paper's
    c.model.merge = "attention"         # choice: the attention paper's merge on DeepLab-v2
                                        # (DeepLab-v2's own MSC rows fuse by max)
    c.model.attention_width = 512       # the attention paper's head
    c.model.attention_dropout = 0.5     # choice: no source gives it (as voc.py)
    c.model.init_from = "imagenet"      # choice: torchvision's ResNet-101 ImageNet weights
                                        # (DeepLab-v2 starts from its Caffe ResNet-101)

    c.loss.extra_supervision = True     # the attention paper; DeepLab-v2's MSC also trains
    c.loss.scale_loss_size = "branch"   # each scale's output on labels shrunk to it
    c.loss.label_resize = "nearest"     # DeepLab-v2 (Caffe): labels shrunk to the scores
    c.loss.type = "ce"

    c.batch_size = 10
    c.optim.base_lr = 2.5e-4
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.schedule, c.optim.poly_power = "poly", 0.9
    # DeepLab-v2 prototxts: ASPP at 10x, biases at 2x (20x in ASPP). choice: the
    # attention head (no source gives its rate) as a new layer like ASPP: 10x, biases 20x.
    c.optim.new_layer_lr_mult = 10.0
    c.optim.new_layer_patterns = ("aspp", "attention", "alpha")
    c.optim.bias_lr_mult = 2.0

    c.train.steps = 20000
    c.train.eval_every = 5000
    c.train.checkpoint_every = 2000

    # Dense CRF (eval.crf): DeepLab-v2 ResNet-101's values, w1 4, theta_alpha 67,
    # theta_beta 3, w2 3, theta_gamma 1, 10 iterations (deeplab-pytorch configs/voc12.yaml
    # CRF: BI_W 4, BI_XY_STD 67, BI_RGB_STD 3, POS_W 3, POS_XY_STD 1, ITER_MAX 10).
    # choice: row normalisation, DeepLab's own densecrf (deeplab-pytorch applies these
    # values through pydensecrf, i.e. symmetric).
    c.crf.bilateral_weight, c.crf.bilateral_xy_std, c.crf.bilateral_rgb_std = 4.0, 67.0, 3.0
    c.crf.gaussian_weight, c.crf.gaussian_xy_std = 3.0, 1.0
    c.crf.iterations, c.crf.normalization = 10, "row"
    return config.variant(c, arg, AXES, "voc_r101")
