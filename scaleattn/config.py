"""The config schema: every key a run can use, its type and a shared default.

Every key is declared here with its type, so that a misspelt or unknown key (in a
config file or a ``--config.a.b=v`` override) is an error that names the key instead
of a silently ignored setting. Config files change values, never add keys:
`base_config` returns a locked dict.

The *recipes* (the values that define a paper's row: schedule, batch, crop,
augmentation, learning-rate multipliers, the start) live in the files of
``configs/``, where a reader of ``configs/voc.py`` sees them. A file states its recipe
once and names its variants, the rows that differ from it in a few values:
``get_config(arg)`` applies the variants named in ``arg`` with `variant`
(``--config=configs/gsag.py:incremental,r50``). `load` is the one loader of a config
file, for the command line and for tools alike.
"""

import dataclasses
import importlib.util
import itertools
import math
import os
from collections.abc import Mapping, Sequence

import ml_collections

from scaleattn.outputs import error_line

# ImageNet mean / std in 0..255 RGB (torchvision's values, scaled).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# The "ignore" value the VOC / SBD label files (and the demo set) store on object
# boundaries. The pipeline maps it to `loss.ignore_label` (this value by default).
VOC_IGNORE_LABEL = 255


def base_config() -> ml_collections.ConfigDict:
    """Every key with its type and shared default, locked: files change values only."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.prng_impl = "rbg"          # jax PRNG: 'rbg' compiles far faster than 'threefry2x32'
    c.batch_size = 30  # global, summed over all devices and hosts (paper: 30)
    c.data = data_keys()
    c.model = model_keys()
    c.loss = loss_keys()
    c.optim = optim_keys()
    c.train = train_keys()
    c.eval = eval_keys()
    c.parallel = parallel_keys()
    c.bench = bench_keys()
    c.predict = predict_keys()
    c.crf = crf_keys()
    c.lock()  # config files may change values but not add keys
    return c


def data_keys() -> ml_collections.ConfigDict:
    """``config.data``: the dataset, its augmentation and the input pipeline."""
    d = ml_collections.ConfigDict()
    d.name = "voc2012"            # TFDS builder: 'voc2012' | 'scale_shapes' (demo)
    d.data_dir = "~/tensorflow_datasets"
    d.manual_dir = ""            # where the VOC/SBD archives are, for building
    d.train_split = "train_aug"
    d.eval_split = "val"
    d.crop_size = 321            # square train crop
    d.scale_range = (0.5, 2.0)   # random rescale before cropping, uniform in (low, high) ...
    d.scale_set = ()             # ... or, when not empty, one of these scales (uniformly;
                                 # DeepLab-v2: (0.5, 0.75, 1.0, 1.25, 1.5))
    d.flip = True
    d.augment_on = "device"      # where rescale / pad / crop / flip run: 'device' (in the
                                 # train step, `scaleattn.augment`; the host only decodes) |
                                 # 'host' (tf.data, `data.pipeline.augment`)
    d.canvas_size = 0            # device augmentation: the uint8 square every train image is
                                 # placed on by the host (0 = eval_size); larger images are
                                 # an error
    d.mean = IMAGENET_MEAN       # pixel mean (0..255 RGB); padding uses it
    d.std = IMAGENET_STD
    d.eval_size = 513            # eval images are padded (label loss.ignore_label) to this square
    d.shuffle_buffer = 1024
    d.prefetch = 2               # tf.data batches prepared ahead on the host
    d.device_prefetch = 2        # batches copied to the device(s) ahead of their step
    d.demo_train_size = 0        # scale_shapes only: images in train/val (0 = builder default)
    d.demo_val_size = 0
    return d


def model_keys() -> ml_collections.ConfigDict:
    """``config.model``: backbone, head, scales and their merge, numerics, the start."""
    m = ml_collections.ConfigDict()
    m.backbone = "vgg16"         # 'vgg16' | 'resnet50' | 'resnet101' | 'resnext101_32x4d' | ...
    m.head = "largefov"          # 'largefov' | 'aspp_v2' | 'gsag'
    m.num_classes = 21
    m.width = 1.0                # channel multiplier for backbone and head (tests: tiny)
    m.depth = ()                 # () = the standard depth; vgg: convs per block (5),
                                 # resnet: blocks per stage (4)
    m.output_stride = 8
    m.bn_mode = "frozen"         # 'frozen' | 'train'
    m.vgg_batch_norm = False     # VGG16: batch norm after every trunk convolution
                                 # (torchvision's vgg16_bn layout; no ImageNet file here);
                                 # a ResNet has its own batch norm and ignores it
    m.sync_bn = True             # batch statistics over all devices when bn_mode='train'
    m.dropout = 0.5              # fc6/fc7 dropout (LargeFOV)
    m.fc_width = 1024            # LargeFOV fc6/fc7 width (before `width`)
    m.fc6_dilation = 12          # LargeFOV fc6 rate
    m.aspp_rates = (6, 12, 18, 24)
    m.multi_grid = ()            # ResNet last-stage per-block dilation multipliers, e.g. (1, 2, 4)
    m.stride_in_1x1 = False      # ResNet: stride on the first 1x1 (Caffe/Keras) vs the 3x3
    m.gsag_variant = "hybrid"    # GSAG head: 'basic' | 'incremental' | 'hybrid'
    m.gsag_channels = 512        # GSAG head width (before `width`)
    m.gsag_window = 7            # GSAG pointwise self-attention window
    m.gsag_global_attention = "pooled"  # GSAG global layer: 'pooled' (one context vector
                                 # per image, the write-up) | 'non_local' (one per position)
    m.gsag_dropout = 0.0
    m.scales = (1.0, 0.75, 0.5)  # share-net input scales; must contain 1.0
    m.merge = "attention"        # 'attention' (softmax over scales) | 'avg' | 'max' |
                                 # 'hierarchical' (relative weights of adjacent scales)
    m.attention_width = 512      # attention head conv3x3 width (before `width`)
    m.attention_dropout = 0.5
    m.alpha_width = 256          # hierarchical: hidden width of the per-branch alpha head
                                 # (before `width`)
    m.inference_scales = ()      # hierarchical: the scales chained at inference (eval,
                                 # ms+flip, predict, analyze); () = model.scales
    m.dtype = "float32"          # compute dtype: 'float32' | 'bfloat16'
    m.dilated_conv = "auto"      # how dilated convs run: 'native' | 'space_to_batch' |
                                 # 'taps' (exact rewrites, same params; `layers.DilatedConv`)
                                 # | 'auto' (per platform, `layers.DILATED_CONV_AUTO`)
    m.fold_frozen_bn = True      # fold batch norm into the conv before it where its
                                 # statistics are constants (`layers.conv_bn`); same params
    m.remat = False              # recompute backbone blocks in the backward pass (less memory)
    m.init_from = "imagenet"     # the start of a fresh run: 'imagenet' (the converted file
                                 # for the backbone in `pretrained_dir`, see `pretrained_file`),
                                 # a path to a file of `python -m scaleattn.convert`, or
                                 # 'scratch' (random initialisation, only when asked for)
    m.pretrained_dir = "~/scaleattn_weights"  # where 'imagenet' looks for <backbone>_imagenet.msgpack
    return m


def loss_keys() -> ml_collections.ConfigDict:
    """``config.loss``: the loss terms, the ignore label, OHEM."""
    l = ml_collections.ConfigDict()
    l.extra_supervision = True   # add one loss per scale to the merged loss
    l.scale_loss_size = "branch"  # per-scale losses on each branch's own score map with the
                                 # labels shrunk to it (paper) | 'merged': after the resize
    l.label_resize = "nearest"   # 'nearest' (labels -> logits size, paper) | 'upsample_logits'
    l.ignore_label = VOC_IGNORE_LABEL  # label of pixels no loss or metric counts (padding,
                                 # boundaries: the files' 255 is mapped to it); num_classes..255
    l.type = "ce"                # 'ce' | 'ohem' (online hard example mining, GSAG)
    l.ohem_threshold = 0.7       # OHEM: keep pixels whose true-class probability is below
    l.ohem_min_kept = 100_000    # ... and at least this many of each image (the same on
                                 # any device layout), counted at the loss's resolution
                                 # (see label_resize)
    return l


def optim_keys() -> ml_collections.ConfigDict:
    """``config.optim``: SGD with momentum, schedule, weight decay, learning-rate multipliers."""
    o = ml_collections.ConfigDict()
    o.base_lr = 1e-3
    o.momentum = 0.9
    o.weight_decay = 5e-4        # L2 on kernels (Caffe-style, added to the gradient)
    o.schedule = "step"          # 'step' | 'poly' | 'constant'
    o.step_size = 2000           # step schedule (Caffe 'step'): lr *= step_factor every
    o.step_factor = 0.1          # step_size steps
    o.poly_power = 0.9
    o.new_layer_lr_mult = 10.0   # for newly initialised layers, found by name:
    o.new_layer_patterns = ("fc8", "aspp", "attention", "alpha", "gsag")
    o.bias_lr_mult = 1.0         # learning-rate multiplier of conv/dense biases (Caffe's
                                 # DeepLab prototxts: 2, so a new layer's bias gets 20x)
    return o


def train_keys() -> ml_collections.ConfigDict:
    """``config.train``: the training loop: length, logging, evaluation, checkpoints."""
    t = ml_collections.ConfigDict()
    t.steps = 6000
    t.log_every = 20
    t.eval_every = 2000
    t.checkpoint_every = 1000
    t.keep_checkpoints = 3       # the last k checkpoints are kept ...
    t.keep_best = False          # ... and, if set, the one with the best eval mIoU
    t.async_checkpoints = True   # Orbax writes in the background while training goes on
    t.grad_accum_steps = 1       # micro-batches per step (gradients summed; one update)
    t.eval_at_end = True
    return t


def eval_keys() -> ml_collections.ConfigDict:
    """``config.eval``: evaluation batches and the CRF switch."""
    e = ml_collections.ConfigDict()
    e.batch_size = 8             # global
    e.max_batches = 0            # 0 = the whole split
    e.crf = False                # post-process with the dense CRF (`crf` below): eval after
                                 # training and --mode=eval (single scale and ms+flip), and
                                 # --mode=predict (writes <name>_mask_crf.png too)
    return e


def parallel_keys() -> ml_collections.ConfigDict:
    """``config.parallel``: how the steps run over devices (`scaleattn.parallel`)."""
    p = ml_collections.ConfigDict()
    p.mode = "pmap"              # 'pmap' | 'sharded' (jit on a mesh) | 'jit' (one device)
    p.mesh_shape = (-1, 1)       # sharded: (data, model) devices; -1 = the rest
    p.param_sharding = "replicated"  # sharded: 'replicated' | 'fsdp' (over data) |
                                 # 'model' (conv kernels' output channels over model)
    p.fsdp_min_size = 2**14      # fsdp / model: smaller arrays stay replicated
    p.exec_time_effort = 0.0     # XLA's exec_time_optimization_effort for every step this
                                 # run compiles, -1..1: 0 = XLA's default; -1 compiled
                                 # TPU steps 5-10x faster, peak memory within ~16% either
                                 # way (docs/preflight.md, "Compile time")
    return p


def bench_keys() -> ml_collections.ConfigDict:
    """``config.bench``: --mode=bench (synthetic batches, one device, no TensorFlow)."""
    b = ml_collections.ConfigDict()
    b.dtypes = "float32,bfloat16"  # compute dtypes to time (comma-separated)
    b.batch_size = 0             # 0 = batch_size
    b.crop_size = 0              # 0 = data.crop_size (train and eval steps alike)
    b.warmup = 3                 # untimed steps after compilation
    b.steps = 10                 # timed steps; the median is reported
    b.dilated_convs = ""         # model.dilated_conv values to time, comma-separated
                                 # ('' = the model's; e.g. 'native,space_to_batch,taps')
    b.fold_frozen_bn = ""        # model.fold_frozen_bn values to time, comma-separated
                                 # ('' = the model's; 'true,false' for both)
    b.profile_dir = ""           # if set, a jax.profiler trace of the timed train steps
                                 # and a table of the ops that took the time
    return b


def predict_keys() -> ml_collections.ConfigDict:
    """``config.predict``: --mode=predict|analyze, TensorBoard pictures, ms+flip eval."""
    q = ml_collections.ConfigDict()
    q.ms_scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # input rescales averaged by ms+flip
    q.flip = True                # ms+flip also averages the mirrored input
    q.ms_eval_at_end = False     # after training and in --mode=eval, also evaluate with ms+flip
    q.summary_images = 3         # eval images shown in TensorBoard (0 = none)
    q.overlay_alpha = 0.5
    return q


def crf_keys() -> ml_collections.ConfigDict:
    """``config.crf``: the fully connected CRF (`scaleattn.crf`) on the merged scores."""
    # Defaults: DeepLab-LargeFOV's (Chen et al., "Semantic Image Segmentation with Deep
    # Convolutional Nets and Fully Connected CRFs", ICLR 2015; the values of its released
    # LargeFOV CRF run: bi_w=4, bi_xy_std=121, bi_rgb_std=5, pos_w=3, pos_xy_std=3, 10
    # mean-field iterations). They were tuned on 500-px VOC photos: search again
    # (--mode=crf_search) for other data.
    r = ml_collections.ConfigDict()
    r.iterations = 10            # mean-field iterations
    r.bilateral_weight = 4.0     # w1: appearance (position + RGB) kernel weight
    r.bilateral_xy_std = 121.0   # theta_alpha: its position standard deviation, pixels
    r.bilateral_rgb_std = 5.0    # theta_beta: its colour standard deviation, 0..255 RGB
    r.gaussian_weight = 3.0      # w2: smoothness (position) kernel weight
    r.gaussian_xy_std = 3.0      # theta_gamma: its standard deviation, pixels
    r.normalization = "row"      # each pixel's message over its kernel sum: 'row' (the 2011
                                 # densecrf that DeepLab's CRF is built on) | 'symmetric'
                                 # (D^-1/2 K D^-1/2, the 2013 release, pydensecrf)
    # --mode=crf_search: every combination of these on the first `search_images` images of
    # data.eval_split, as DeepLab searched (w2, theta_gamma fixed; 100 val images; its
    # first, coarse grid: w1 5..10, theta_alpha 50..100 step 10, theta_beta 3..6).
    r.search_images = 100
    r.search_bilateral_weights = (5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
    r.search_bilateral_xy_stds = (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
    r.search_bilateral_rgb_stds = (3.0, 4.0, 5.0, 6.0)
    return r


INIT_SCRATCH, INIT_IMAGENET = "scratch", "imagenet"
PRETRAINED_SUFFIX = "_imagenet.msgpack"
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


def config_module(path: str, where: str):
    """The module of config file ``path``, executed; `ConfigError` (naming ``where``)
    when it is missing, does not parse or fails to import."""
    if not os.path.isfile(path):
        shipped_files = ", ".join(sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py")))
        raise ConfigError(f"{where}: no such file (the shipped recipes are configs/"
                          f"{{{shipped_files}}}, their variants named after a colon, e.g. "
                          f"--config=configs/voc.py:s2; docs/configs.md lists them)")
    try:
        spec = importlib.util.spec_from_file_location(
            "scaleattn_config_" + os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{where} does not parse: {e.msg} (line {e.lineno})") from None
    except Exception as e:  # pylint: disable=broad-except  # any error in the user's file
        raise ConfigError(f"{where} cannot be loaded: "
                          f"{error_line(e, with_type=True)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{where}: the file has no get_config() function (a config "
                          f"file defines get_config() returning a ConfigDict, see "
                          f"configs/demo.py)")
    return module


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``spec``, ``PATH`` or ``PATH:ARG``: the file's ``get_config()`` or
    ``get_config(ARG)``, unlocked. Raises `ConfigError` in one line when the file is
    missing, does not parse, has no ``get_config`` or fails in it."""
    path, *arg = spec.split(":", 1)
    where = f"--config={spec}"
    module = config_module(path, where)
    try:
        config = module.get_config(*arg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # pylint: disable=broad-except  # any error in the user's file
        raise ConfigError(f"{where} cannot be loaded: "
                          f"{error_line(e, with_type=True)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{where}: get_config() returned a {type(config).__name__}, not a "
                          f"ConfigDict")
    return config


def shipped() -> list[str]:
    """Every shipped config as ``configs/<file>.py[:ARG]``: each file of ``configs/``
    with each combination of the variants its ``AXES`` name (the defaults without ARG)."""
    specs = []
    for file in sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py")):
        path = os.path.join("configs", file)
        axes = config_module(os.path.join(CONFIGS_DIR, file), path).AXES
        for names in itertools.product(*axes):
            chosen = [n for axis, n in zip(axes, names) if n and n != next(iter(axis))]
            specs.append(path + (":" + ",".join(chosen) if chosen else ""))
    return specs


def recipe(name: str) -> ml_collections.ConfigDict:
    """A shipped config by its short name: ``recipe('voc:avg')`` is `load` of
    ``configs/voc.py:avg`` (tests and tools read the shipped recipes with it)."""
    file, *arg = name.split(":", 1)
    return load(":".join([os.path.join(CONFIGS_DIR, f"{file}.py"), *arg]))


Variants = Mapping[str, Mapping[str, object]]


def variant(config: ml_collections.ConfigDict, arg: str | None, axes: Sequence[Variants],
            prefix: str) -> ml_collections.ConfigDict:
    """``config`` changed by the variants named in ``arg`` and named after them.

    ``axes``: one ``{variant name: {'section.key': value}}`` per independent choice (the
    head, the backbone, ...), its first entry the default. ``arg`` names at most one
    variant per axis, comma-separated, in any order (None or '' = the defaults). The
    result's ``name`` is ``prefix`` and the chosen names of every axis joined by '_'
    (an empty name adds nothing): ``variant(c, 'r50,incremental', (HEADS, BACKBONES),
    'gsag')`` is named ``gsag_incremental_r50``. An unknown name, or two from one axis,
    raise `ConfigError`.
    """
    chosen = [next(iter(axis)) for axis in axes]
    given = set()
    for word in comma_list(arg or ""):
        index = next((i for i, axis in enumerate(axes) if word in axis), None)
        if index is None:
            known = ", ".join(name for axis in axes for name in axis if name)
            raise ConfigError(f"config variant {word!r} of {prefix} is not one of: {known}")
        if index in given:
            raise ConfigError(f"config variants {chosen[index]!r} and {word!r} of {prefix} "
                              f"are two choices of one kind: name one")
        given.add(index)
        chosen[index] = word
    for axis, name in zip(axes, chosen):
        for key, value in axis[name].items():
            *sections, last = key.split(".")
            node = config
            for section in sections:
                node = node[section]
            node[last] = value
    config.name = "_".join([prefix, *(name for name in chosen if name)])
    return config


def pretrained_file(model_config: ml_collections.ConfigDict) -> str | None:
    """The converted ImageNet file a fresh run starts from, ``None`` for 'scratch'.

    ``model.init_from='imagenet'`` means ``<model.pretrained_dir>/<backbone>_imagenet.msgpack``;
    any other value except 'scratch' is the file's path.
    """
    if model_config.init_from == INIT_SCRATCH:
        return None
    if model_config.init_from == INIT_IMAGENET:
        return os.path.join(os.path.expanduser(model_config.pretrained_dir),
                            model_config.backbone + PRETRAINED_SUFFIX)
    return os.path.expanduser(model_config.init_from)


def convert_command(backbone: str, destination: str) -> str:
    """The command that writes ``destination`` for ``backbone`` from torchvision's weights."""
    sources = {"vgg16": "vgg16-397923af.pth", "resnet50": "resnet50-0676ba61.pth",
               "resnet101": "resnet101-63fe2227.pth",
               "resnext101_32x4d": "resnext101_32x4d.safetensors",
               "resnext101_32x8d": "resnext101_32x8d-8ba56ff5.pth"}
    return (f"python -m scaleattn.convert --from=torchvision --arch={backbone} "
            f"/path/to/{sources.get(backbone, backbone + '.pth')} {destination}")


def inference_scales(model_config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """The scales a model runs on at inference: ``model.inference_scales`` or, if empty,
    the training scales ``model.scales``."""
    return tuple(model_config.inference_scales) or tuple(model_config.scales)


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated config string ('a, b,' -> [a, b])."""
    return [item.strip() for item in text.split(",") if item.strip()]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


CHOICES = {
    "data.name": ("voc2012", "scale_shapes"),
    "data.augment_on": ("device", "host"),
    "model.backbone": ("vgg16", "resnet50", "resnet101", "resnext101_32x4d",
                       "resnext101_32x8d"),
    "model.head": ("largefov", "aspp_v2", "gsag"),
    "model.merge": ("attention", "avg", "max", "hierarchical"),
    "model.bn_mode": ("frozen", "train"),
    "model.dtype": ("float32", "bfloat16"),
    "model.dilated_conv": ("auto", "native", "space_to_batch", "taps"),
    "model.gsag_variant": ("basic", "incremental", "hybrid"),
    "model.gsag_global_attention": ("pooled", "non_local"),
    "loss.label_resize": ("nearest", "upsample_logits"),
    "loss.scale_loss_size": ("branch", "merged"),
    "loss.type": ("ce", "ohem"),
    "optim.schedule": ("step", "poly", "constant"),
    "parallel.mode": ("pmap", "jit", "sharded"),
    "parallel.param_sharding": ("replicated", "fsdp", "model"),
    "prng_impl": ("rbg", "unsafe_rbg", "threefry2x32"),
    "crf.normalization": ("row", "symmetric"),
}


def check_choice(key: str, value) -> None:
    """Raises `ConfigError` unless ``value`` is one of ``CHOICES[key]``, the one list of
    the allowed values of ``config.<key>`` (the modules that act on a key check it
    here, so the list and the message exist once)."""
    if value not in CHOICES[key]:
        raise ConfigError(f"config.{key}={value!r} is not one of {CHOICES[key]}")


def lookup(config: ml_collections.ConfigDict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a key may hold: ``low``..``high`` (``None``: unbounded; ``open_low`` /
    ``open_high`` exclude the end), every value finite and not a bool, plus the
    ``special`` values outside it that mean something (``((0, 'the whole split'),)``)."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    special: tuple = ()          # ((value, meaning), ...)

    def holds(self, value) -> bool:
        """Whether ``value`` is allowed."""
        if any(value == v and type(value) is not bool for v, _ in self.special):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high
                                        else value <= self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        """The allowed values in words, e.g. ``'in (0, 1]'``, ``'>= 1 or 0 (the whole split)'``."""
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.open_high else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.open_low else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.open_high else '<='} {self.high:g}"
        else:
            text = "a finite number"
        return text + "".join(f" or {v!r} ({meaning})" for v, meaning in self.special)


@dataclasses.dataclass(frozen=True)
class Items:
    """A tuple key: ``length`` values (an int, or ``(min, max)`` with ``max`` ``None`` for
    no limit), each in ``each``; ``distinct``: no value twice; ``ascending``: low to high."""
    each: Range
    length: int | tuple = (1, None)
    distinct: bool = False
    ascending: bool = False

    def holds(self, value) -> bool:
        if not isinstance(value, (tuple, list)):
            return False
        low, high = (self.length, self.length) if isinstance(self.length, int) else self.length
        return (low <= len(value) and (high is None or len(value) <= high)
                and all(self.each.holds(v) for v in value)
                and (not self.distinct or len(set(value)) == len(value))
                and (not self.ascending or list(value) == sorted(value)))

    def describe(self) -> str:
        low, high = (self.length, self.length) if isinstance(self.length, int) else self.length
        count = (f"{low}" if low == high else f"{low} or more" if high is None
                 else f"{low} to {high}")
        return (f"a tuple of {count} {'distinct ' if self.distinct else ''}values, each "
                f"{self.each.describe()}{', low to high' if self.ascending else ''}")


COUNT = Range(1)                 # a count that must be at least one
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1, open_high=True)   # dropout, momentum: [0, 1)
SCALE = Range(0, 4, open_low=True)       # an input rescale: larger ones exhaust memory
PIXEL = Range(0, 255)

# The valid values of every numeric and tuple key of `base_config` (string keys: `CHOICES`),
# checked once when a config is loaded (`check_ranges`, from `validate`); a key added to
# the schema gets its line here (a test checks that every key has one).
RANGES = {
    "seed": NON_NEGATIVE,
    "batch_size": COUNT,
    "data.crop_size": COUNT,
    "data.scale_range": Items(SCALE, length=2, ascending=True),
    "data.scale_set": Items(SCALE, length=(0, None), distinct=True),
    "data.canvas_size": Range(1, special=((0, "= data.eval_size"),)),
    "data.mean": Items(PIXEL, length=3),
    "data.std": Items(Range(0, 255, open_low=True), length=3),
    "data.eval_size": COUNT,
    "data.shuffle_buffer": COUNT,
    "data.prefetch": NON_NEGATIVE,
    "data.device_prefetch": NON_NEGATIVE,
    "data.demo_train_size": Range(1, special=((0, "the builder's default"),)),
    "data.demo_val_size": Range(1, special=((0, "the builder's default"),)),
    "model.num_classes": Range(1, 255),
    "model.width": Range(0, 4, open_low=True),
    "model.depth": Items(COUNT, length=(0, None)),
    "model.output_stride": Range(8, 32),
    "model.dropout": FRACTION,
    "model.fc_width": COUNT,
    "model.fc6_dilation": COUNT,
    "model.aspp_rates": Items(COUNT),
    "model.multi_grid": Items(COUNT, length=(0, None)),
    "model.gsag_channels": COUNT,
    "model.gsag_window": COUNT,
    "model.gsag_dropout": FRACTION,
    "model.scales": Items(SCALE, distinct=True),
    "model.attention_width": COUNT,
    "model.attention_dropout": FRACTION,
    "model.alpha_width": COUNT,
    "model.inference_scales": Items(SCALE, length=(0, None), distinct=True),
    "loss.ignore_label": Range(1, 255),
    "loss.ohem_threshold": Range(0, 1, open_low=True),
    "loss.ohem_min_kept": NON_NEGATIVE,
    "optim.base_lr": POSITIVE,
    "optim.momentum": FRACTION,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.step_size": COUNT,
    "optim.step_factor": Range(0, 1, open_low=True),
    "optim.poly_power": POSITIVE,
    "optim.new_layer_lr_mult": NON_NEGATIVE,
    "optim.bias_lr_mult": NON_NEGATIVE,
    "train.steps": COUNT,
    "train.log_every": COUNT,
    "train.eval_every": Range(1, special=((0, "only at the end"),)),
    "train.checkpoint_every": COUNT,
    "train.keep_checkpoints": COUNT,
    "train.grad_accum_steps": COUNT,
    "eval.batch_size": COUNT,
    "eval.max_batches": Range(1, special=((0, "the whole split"),)),
    "parallel.mesh_shape": Items(Range(1, special=((-1, "the rest"),)), length=2),
    "parallel.fsdp_min_size": NON_NEGATIVE,
    "parallel.exec_time_effort": Range(-1, 1),
    "bench.batch_size": Range(1, special=((0, "= batch_size"),)),
    "bench.crop_size": Range(1, special=((0, "= data.crop_size"),)),
    "bench.warmup": NON_NEGATIVE,
    "bench.steps": COUNT,
    "predict.ms_scales": Items(SCALE, distinct=True),
    "predict.summary_images": NON_NEGATIVE,
    "predict.overlay_alpha": Range(0, 1),
    "crf.iterations": COUNT,
    "crf.bilateral_weight": NON_NEGATIVE,
    "crf.bilateral_xy_std": POSITIVE,
    "crf.bilateral_rgb_std": POSITIVE,
    "crf.gaussian_weight": NON_NEGATIVE,
    "crf.gaussian_xy_std": POSITIVE,
    "crf.search_images": COUNT,
    "crf.search_bilateral_weights": Items(NON_NEGATIVE, distinct=True),
    "crf.search_bilateral_xy_stds": Items(POSITIVE, distinct=True),
    "crf.search_bilateral_rgb_stds": Items(POSITIVE, distinct=True),
}


def check_value(key: str, value, rule: "Range | Items | None" = None) -> None:
    """Raises `ConfigError` naming ``config.<key>``, ``value`` and the allowed values
    unless ``rule`` (default ``RANGES[key]``) holds for it."""
    rule = rule or RANGES[key]
    if not rule.holds(value):
        shown = tuple(value) if isinstance(value, list) else value
        raise ConfigError(f"config.{key}={shown!r} is out of range: it must be "
                          f"{rule.describe()}")


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """`check_value` for every key of `RANGES` the config has (in table order)."""
    flat = flatten(config)
    for key, rule in RANGES.items():
        if key in flat:
            check_value(key, flat[key], rule)


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """``{'model.width': 1.0, ...}`` of every leaf of a (nested) config."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


DEPTH_BLOCKS = {"vgg16": 5}      # model.depth entries per backbone (ResNets: 4 stages)


def check_relations(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` for values that are each in range (`RANGES`) but do not work
    together: the depth's length for the backbone, the output stride for the backbone,
    and scales so small that an input gives less than one output pixel."""
    model, data = config.model, config.data
    blocks = DEPTH_BLOCKS.get(model.backbone, 4)
    if model.depth and len(model.depth) != blocks:
        raise ConfigError(f"config.model.depth={tuple(model.depth)} has {len(model.depth)} "
                          f"entries; model.backbone={model.backbone!r} has {blocks} blocks "
                          f"(or () for the standard depth)")
    strides = (8,) if model.backbone == "vgg16" else (8, 16, 32)
    if model.output_stride not in strides:
        raise ConfigError(f"config.model.output_stride={model.output_stride} is not one of "
                          f"{strides} for model.backbone={model.backbone!r}")
    # The smallest input a branch sees must give at least one output pixel.
    smallest_model_scale = min(tuple(model.scales) + tuple(model.inference_scales))
    inputs = (("model.scales", "data.crop_size", min(model.scales), data.crop_size),
              ("model.scales", "data.eval_size", smallest_model_scale, data.eval_size),
              ("predict.ms_scales", "data.eval_size",
               min(config.predict.ms_scales) * smallest_model_scale, data.eval_size))
    for key, size_key, scale, size in inputs:
        if size * scale < model.output_stride:
            raise ConfigError(
                f"config.{key}={tuple(lookup(config, key))}: the smallest input, "
                f"config.{size_key}={size} x {scale:g}, is less than one output pixel "
                f"(model.output_stride={model.output_stride}); use larger scales or sizes")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first key whose value cannot work."""
    for key in CHOICES:
        check_choice(key, lookup(config, key))
    scales = tuple(config.model.scales)
    inference = tuple(config.model.inference_scales)
    if inference and config.model.merge != "hierarchical" and inference != scales:
        raise ConfigError(f"config.model.inference_scales={inference} differs from "
                          f"model.scales={scales}: only model.merge='hierarchical' can run on "
                          f"scales it was not trained on (set inference_scales=())")
    check_ranges(config)
    if inference and 1.0 not in inference:
        raise ConfigError(f"config.model.inference_scales={inference} must contain 1.0 (the "
                          f"reference size)")
    if 1.0 not in scales:
        raise ConfigError(f"config.model.scales={scales} must contain 1.0 (the reference "
                          f"size)")
    check_relations(config)
    ignore = config.loss.ignore_label
    if not config.model.num_classes <= ignore <= 255:
        raise ConfigError(f"config.loss.ignore_label={ignore} must be in "
                          f"model.num_classes={config.model.num_classes}..255 (not a class id, "
                          f"and it must fit the uint8 labels of the pipeline)")
    if config.parallel.param_sharding != "replicated" and config.parallel.mode != "sharded":
        raise ConfigError(f"config.parallel.param_sharding={config.parallel.param_sharding!r} "
                          f"needs config.parallel.mode='sharded'")
    for key, choices in (("bench.dilated_convs", "model.dilated_conv"),
                         ("bench.dtypes", "model.dtype")):
        for item in comma_list(lookup(config, key)):
            if item not in CHOICES[choices]:
                raise ConfigError(f"config.{key} has {item!r}, not one of {CHOICES[choices]}")
    for item in comma_list(config.bench.fold_frozen_bn):
        if item not in ("true", "false"):
            raise ConfigError(f"config.bench.fold_frozen_bn has {item!r}, not 'true' or 'false'")
    if (config.model.vgg_batch_norm and config.model.backbone == "vgg16"
            and config.model.init_from == "imagenet"):
        raise ConfigError("config.model.vgg_batch_norm=True has no converted ImageNet file "
                          "(the DeepLab VGG16 has no batch norm): set model.init_from='scratch' "
                          "or a converted file of this layout")
    if config.model.remat and not config.model.backbone.startswith("res"):
        raise ConfigError(f"config.model.remat=True recomputes ResNet/ResNeXt blocks; "
                          f"model.backbone={config.model.backbone!r} has none (set it False)")
    if not config.model.init_from.strip():
        raise ConfigError("config.model.init_from is empty: say how a fresh run starts, "
                          "'imagenet' (converted ImageNet weights), a converted file's path, "
                          "or 'scratch' (random initialisation)")
    if config.batch_size % config.train.grad_accum_steps:
        raise ConfigError(f"config.batch_size={config.batch_size} must divide into "
                          f"config.train.grad_accum_steps={config.train.grad_accum_steps} "
                          f"micro-batches")


def validate_crf(crf: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first ``crf.*`` key whose value cannot work."""
    for key, value in flatten(crf, "crf.").items():
        if key in RANGES:
            check_value(key, value)
