"""ImageNet weights (torchvision or Keras) -> the Flax backbones of `scaleattn.models`.

    python -m scaleattn.convert --from=torchvision|keras --arch=ARCH SRC DST

reads SRC (a torchvision ``.pth`` / ``.safetensors`` state dict, or a Keras ``.h5`` /
``.keras`` file; see `scaleattn.weights`, no PyTorch or TensorFlow needed), converts the
backbone (for ``vgg16`` also DeepLab-LargeFOV's fc6/fc7) and writes DST, which
``config.model.init_from=DST`` loads into a fresh run (`weights.load_pretrained`).

What the conversion does, leaf by leaf (our names: `models.vgg`, `models.resnet`):

* **Layouts.** torch conv kernels ``[O, I, kh, kw]`` -> HWIO ``[kh, kw, I, O]``; Keras
  kernels are HWIO already. BN ``weight/bias/running_mean/running_var`` (Keras
  ``gamma/beta/moving_mean/moving_variance``) -> ``scale/bias`` (params) and
  ``mean/var`` (batch_stats).
* **Caffe-style ResNets (Keras).** ``keras.applications`` ResNet50/101 put a block's
  stride on its first 1x1 conv (convert writes ``stride_in_1x1=True`` into DST's meta
  and the config must say the same) and give every conv a bias, which our bias-free
  convs fold into the following BN: ``BN(conv(x) + b) = BN'(conv(x))`` with
  ``mean' = mean - b``. Keras' BN epsilon 1.001e-5 becomes ours (1e-5) through
  ``var' = var + 1e-8``.
* **VGG16's fully connected layers -> LargeFOV** (DeepLab's surgery). fc6
  (``[4096, 512*7*7]``) is the 7x7 conv it is on pool5; DeepLab keeps every 4th output
  filter (4096 -> 1024) and the taps 0, 3, 6 of each spatial axis (7x7 -> 3x3). On
  VGG's stride-32 pool5 the taps are 32 pixels apart; on LargeFOV's stride-8 map that is
  4 cells, and every 3rd tap is 12: the 3x3 conv with dilation 12. fc7 keeps every 4th
  input and output (4096x4096 -> 1024x1024). torch flattens pool5 as ``(C, H, W)``,
  Keras as ``(H, W, C)``.
* **Input normalisation.** Our pipeline feeds RGB ``(x - data.mean) / data.std`` on
  0..255 pixels. torchvision models expect exactly that with ImageNet's mean/std (the
  config's defaults). Keras' VGG16/ResNet use 'caffe' preprocessing: BGR, minus
  (103.939, 116.779, 123.68), no std. Any difference is folded into the first conv
  (`fold_input_convention`): its input channels are reordered and scaled by the std
  ratio, and the mean difference becomes a bias (conv1_1's bias, or for a ResNet a shift
  of bn1's mean). The result is exact except at the image border, where the source pads
  with *its* mean and we with ours: for Keras sources and the default ImageNet mean that
  is a shift of at most 0.5 grey levels in the padding (~2e-4 relative on VGG16's conv5
  features of a 64x64 image, less on larger ones). ``--mean`` equal to the source's mean
  (and the same ``config.data.mean``) makes the copy exact up to float rounding.

Errors name the file and key: a key the architecture needs that SRC lacks, a key of SRC
that the architecture does not use (e.g. ``--arch=resnet50`` on ResNet-101 weights), or a
shape that does not fit.
"""

import argparse
import dataclasses
import functools
import os
import re
import sys
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scaleattn import outputs
from scaleattn.config import IMAGENET_MEAN, IMAGENET_STD
from scaleattn.models import heads, resnet, vgg
from scaleattn.weights import FORMAT, WeightsError, read_weights, save_pretrained

SOURCES = ("torchvision", "keras")
ARCHS = ("vgg16", "resnet50", "resnet101", "resnext101_32x4d", "resnext101_32x8d")
KERAS_ARCHS = ("vgg16", "resnet50", "resnet101")   # what keras.applications offers

Path = tuple[str, ...]   # ('params' | 'batch_stats', 'backbone' | 'largefov', ..., leaf)


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """What a network expects: 0..255 pixels in ``bgr`` or RGB order, then
    ``(x - mean) / std`` with ``mean``/``std`` listed in that same channel order."""
    bgr: bool
    mean: tuple
    std: tuple


INPUT_CONVENTIONS = {
    # torchvision: RGB in [0, 1] normalised by (0.485, 0.456, 0.406) / (0.229, 0.224,
    # 0.225) -- the same numbers as the config's IMAGENET_MEAN / IMAGENET_STD x 255.
    "torchvision": InputConvention(False, IMAGENET_MEAN, IMAGENET_STD),
    # keras.applications.{vgg16,resnet}.preprocess_input, mode 'caffe'.
    "keras": InputConvention(True, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
}

FC_CHANNEL_STEP = 4      # DeepLab keeps every 4th fc6/fc7 channel: 4096 -> 1024
FC6_TAP_STEP = 3         # ... and fc6's taps 0, 3, 6 of 7: 7x7 -> 3x3
VGG_FC_SIZE = 7          # pool5 of a 224 input: fc6 is a 7x7 conv on it
BN_EPSILON = 1e-5                  # ours (layers.batch_norm) and torchvision's
KERAS_RESNET_BN_EPSILON = 1.001e-5  # keras.applications.resnet

IGNORED = {   # source keys that are not part of the backbone (ImageNet classifiers ...)
    "torchvision": re.compile(r"^(fc\.(weight|bias)|classifier\.6\.(weight|bias)|"
                              r".*num_batches_tracked)$"),
    "keras": re.compile(r"^(predictions|probs)/"),
}


# --------------------------------------------------------------------------- targets


def target_shapes(arch: str, *, width: float = 1.0, depth: Sequence[int] = ()
                  ) -> dict[Path, tuple[int, ...]]:
    """Shapes of every array DST holds for ``arch``, computed from the model code.

    ``{('params', 'backbone', 'conv1', 'kernel'): (7, 7, 3, 64), ...}``; for vgg16 also
    ``('params', 'largefov', 'fc6' | 'fc7', 'kernel' | 'bias')``. ``width`` and ``depth``
    are the models' reduced variants (tests); ImageNet weights need the defaults.
    """
    return dict(_target_shapes(arch, width, tuple(depth)))


@functools.lru_cache(maxsize=None)
def _target_shapes(arch: str, width: float, depth: tuple[int, ...]
                   ) -> dict[Path, tuple[int, ...]]:
    """`target_shapes`, cached: tracing ResNet-101 takes a second."""
    key, image = jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)
    if arch == "vgg16":
        trunk = vgg.VGG16(width=width, depth=tuple(depth))
    elif arch in resnet.ARCHITECTURES:
        trunk = resnet.resnet(arch, width=width, depth=tuple(depth), output_stride=32)
    else:
        raise WeightsError(f"unknown --arch={arch!r}; one of {ARCHS}")
    features, variables = jax.eval_shape(
        lambda: trunk.init_with_output(key, image, train=False))
    shapes = {(col, "backbone") + _keys(p): tuple(leaf.shape) for col, tree in
              variables.items() for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if arch == "vgg16":
        head = heads.LargeFOVHead(num_classes=1, width=width)
        head_vars = jax.eval_shape(lambda: head.init(
            key, jnp.zeros(features.shape, features.dtype), train=False))
        for p, leaf in jax.tree_util.tree_flatten_with_path(head_vars["params"])[0]:
            if _keys(p)[0] in ("fc6", "fc7"):
                shapes[("params", "largefov") + _keys(p)] = tuple(leaf.shape)
    return dict(sorted(shapes.items(), key=lambda item: natural_order(item[0])))


def natural_order(path: Path) -> tuple:
    """Sort key that puts ``layer3_6`` before ``layer3_10`` (the network's order)."""
    return tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part))
                 for part in path)


def _keys(path) -> Path:
    return tuple(str(getattr(k, "key", k)) for k in path)


# --------------------------------------------------------------------------- names


def vgg_feature_indices(depth: Sequence[int] = ()) -> dict[str, int]:
    """torchvision's ``features.<i>`` index of each VGG conv: every conv is followed by a
    ReLU and every block by a max pool, so ``conv1_1 -> 0, conv1_2 -> 2, conv2_1 -> 5``
    ... ``conv5_3 -> 28``."""
    index, out = 0, {}
    for block, convs in enumerate(tuple(depth) or vgg.VGG16_DEPTH, start=1):
        for i in range(1, convs + 1):
            out[f"conv{block}_{i}"] = index
            index += 2
        index += 1
    return out


TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias",
                "mean": "running_mean", "var": "running_var"}
TORCH_MODULES = {"downsample_conv": "downsample.0", "bn_downsample": "downsample.1",
                 "fc6": "classifier.0", "fc7": "classifier.3"}


def torchvision_name(path: Path, depth: Sequence[int] = ()) -> str:
    """Torchvision key of one of our leaves, e.g.
    ``('params', 'backbone', 'layer1_0', 'downsample_conv', 'kernel') ->
    'layer1.0.downsample.0.weight'``, ``(.., 'conv2_1', 'bias') -> 'features.5.bias'``."""
    modules, leaf = path[2:-1], path[-1]
    if re.fullmatch(r"conv\d_\d", modules[0]):               # VGG trunk
        names = [f"features.{vgg_feature_indices(depth)[modules[0]]}"]
    else:
        names = [TORCH_MODULES.get(m, re.sub(r"^(layer\d)_(\d+)$", r"\1.\2", m))
                 for m in modules]
    return ".".join(names + [TORCH_LEAVES[leaf]])


KERAS_BN_LEAVES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean",
                   "var": "moving_variance"}
KERAS_BLOCK_LAYERS = {"downsample_conv": "0_conv", "bn_downsample": "0_bn"}


def keras_layer(modules: Path) -> str:
    """Keras layer name of one of our modules: ``conv1_1 -> block1_conv1``, ``fc6 ->
    fc1``, ``conv1 -> conv1_conv``, ``(layer2_0, bn_downsample) -> conv3_block1_0_bn``."""
    first = modules[0]
    if re.fullmatch(r"conv\d_\d", first):
        return "block{}_conv{}".format(*first[4:].split("_"))
    if first in ("fc6", "fc7"):
        return {"fc6": "fc1", "fc7": "fc2"}[first]
    if len(modules) == 1:
        return {"conv1": "conv1_conv", "bn1": "conv1_bn"}[first]
    stage, block = (int(v) for v in re.fullmatch(r"layer(\d)_(\d+)", first).groups())
    inner = KERAS_BLOCK_LAYERS.get(modules[1]) or (
        f"{modules[1][-1]}_{'bn' if modules[1].startswith('bn') else 'conv'}")
    return f"conv{stage + 1}_block{block + 1}_{inner}"


def keras_name(path: Path) -> str:
    """Keras ``'<layer>/<variable>'`` of one of our leaves, e.g.
    ``('batch_stats', 'backbone', 'layer1_0', 'bn2', 'var') ->
    'conv2_block1_2_bn/moving_variance'``."""
    modules, leaf = path[2:-1], path[-1]
    is_bn = modules[-1].startswith("bn")
    return f"{keras_layer(modules)}/{KERAS_BN_LEAVES[leaf] if is_bn else leaf}"


def paired_conv(bn_module: str) -> str:
    """The conv a BN follows: ``bn1 -> conv1``, ``bn3 -> conv3``, ``bn_downsample ->
    downsample_conv``."""
    return "downsample_conv" if bn_module == "bn_downsample" else "conv" + bn_module[2:]


# --------------------------------------------------------------------------- layouts


def conv_kernel_from_torch(w: np.ndarray) -> np.ndarray:
    """``[O, I, kh, kw]`` (torch) -> ``[kh, kw, I, O]`` (Flax)."""
    if w.ndim != 4:
        raise ValueError(f"a conv weight must be 4-D [O, I, kh, kw], got shape {w.shape}")
    return w.transpose(2, 3, 1, 0)


def fc_as_conv_from_torch(w: np.ndarray, size: int) -> np.ndarray:
    """torch Linear ``[O, C*size*size]`` reading a ``(C, H, W)``-flattened map ->
    the equivalent ``[size, size, C, O]`` conv kernel."""
    out, inp = w.shape
    return w.reshape(out, inp // (size * size), size, size).transpose(2, 3, 1, 0)


def fc_as_conv_from_keras(w: np.ndarray, size: int) -> np.ndarray:
    """Keras Dense ``[size*size*C, O]`` reading an ``(H, W, C)``-flattened map ->
    the equivalent ``[size, size, C, O]`` conv kernel."""
    inp, out = w.shape
    return w.reshape(size, size, inp // (size * size), out)


def largefov_fc6(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VGG's fc6 as a conv, ``[7, 7, C, 4096], [4096]`` -> LargeFOV's
    ``[3, 3, C, 1024], [1024]``: taps 0, 3, 6 and every 4th filter (DeepLab)."""
    if kernel.shape[:2] != (VGG_FC_SIZE, VGG_FC_SIZE):
        raise ValueError(f"fc6 must be a {VGG_FC_SIZE}x{VGG_FC_SIZE} conv, got {kernel.shape}")
    return (kernel[::FC6_TAP_STEP, ::FC6_TAP_STEP, :, ::FC_CHANNEL_STEP],
            bias[::FC_CHANNEL_STEP])


def largefov_fc7(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VGG's fc7 as a 1x1 conv ``[1, 1, 4096, 4096], [4096]`` -> ``[1, 1, 1024, 1024],
    [1024]``: every 4th input (fc6's kept filters) and output channel."""
    return kernel[:, :, ::FC_CHANNEL_STEP, ::FC_CHANNEL_STEP], bias[::FC_CHANNEL_STEP]


def fold_input_convention(kernel: np.ndarray, source: InputConvention,
                          mean: Sequence[float], std: Sequence[float]
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The first conv re-expressed for our pipeline's input.

    The source network sees ``s[c] = (p[src(c)] - m_src[c]) / d_src[c]`` for 0..255 pixels
    ``p``, where ``src(c)`` is the RGB channel of its channel ``c`` (reversed for BGR). We
    feed ``x[k] = (p[k] - mean[k]) / std[k]``, so ``s[c] = a[c] x[src(c)] + b[c]`` with
    ``a = std[src] / d_src`` and ``b = (mean[src] - m_src) / d_src``.

    Args:
      kernel: ``[kh, kw, 3, O]`` whose inputs are the source's channels.
      source: the source's `InputConvention`.
      mean, std: our pipeline's (``config.data``) RGB mean and std.

    Returns:
      ``(kernel', shift)``: ``kernel' [kh, kw, 3, O]`` reads our RGB channels, and
      ``conv(s) = conv'(x) + shift`` (``shift [O]``) away from the image border.
    """
    order = [2, 1, 0] if source.bgr else [0, 1, 2]     # its own inverse
    mean64, std64 = np.asarray(mean, np.float64)[order], np.asarray(std, np.float64)[order]
    a = std64 / np.asarray(source.std, np.float64)
    b = (mean64 - np.asarray(source.mean, np.float64)) / np.asarray(source.std, np.float64)
    k64 = np.asarray(kernel, np.float64)
    shift = np.einsum("hwco,c->o", k64, b)
    folded = (k64 * a[None, None, :, None])[:, :, order, :]
    return folded.astype(np.float32), shift.astype(np.float32)


# --------------------------------------------------------------------------- rules


class MissingKey(WeightsError):
    """A key a leaf needs is not in SRC (collected, then reported together)."""

    def __init__(self, key: str, path: Path):
        super().__init__(key)
        self.key, self.path = key, path


class Source:
    """The arrays of SRC by name; remembers what was taken (for errors and leftovers)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], name: str):
        self.arrays, self.name = arrays, name
        self.used: set[str] = set()
        self.taken: list[str] = []

    def take(self, key: str, for_path: Path) -> np.ndarray:
        if key not in self.arrays:
            raise MissingKey(key, for_path)
        self.used.add(key)
        self.taken.append(key)
        return self.arrays[key]

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.arrays)


def torchvision_leaf(path: Path, src: Source, depth: Sequence[int]) -> np.ndarray:
    """One of our arrays from a torchvision state dict (before input folding)."""
    modules, leaf = path[2:-1], path[-1]
    if modules[0] in ("fc6", "fc7"):
        w = src.take(torchvision_name(path[:-1] + ("kernel",), depth), path)
        b = src.take(torchvision_name(path[:-1] + ("bias",), depth), path)
        kernel = (fc_as_conv_from_torch(w, VGG_FC_SIZE) if modules[0] == "fc6"
                  else w.T.reshape(1, 1, w.shape[1], w.shape[0]))
        kernel, bias = (largefov_fc6 if modules[0] == "fc6" else largefov_fc7)(kernel, b)
        return bias if leaf == "bias" else kernel
    value = src.take(torchvision_name(path, depth), path)
    return conv_kernel_from_torch(value) if leaf == "kernel" else value


def keras_leaf(path: Path, src: Source, depth: Sequence[int]) -> np.ndarray:
    """One of our arrays from Keras weights (before input folding); BN statistics
    absorb the preceding conv's bias and Keras' BN epsilon."""
    del depth
    modules, leaf = path[2:-1], path[-1]
    if modules[0] in ("fc6", "fc7"):
        w = src.take(keras_name(path[:-1] + ("kernel",)), path)
        b = src.take(keras_name(path[:-1] + ("bias",)), path)
        kernel = (fc_as_conv_from_keras(w, VGG_FC_SIZE) if modules[0] == "fc6"
                  else w.reshape(1, 1, *w.shape))
        kernel, bias = (largefov_fc6 if modules[0] == "fc6" else largefov_fc7)(kernel, b)
        return bias if leaf == "bias" else kernel
    value = src.take(keras_name(path), path)
    if leaf == "mean":
        conv = keras_layer(modules[:-1] + (paired_conv(modules[-1]),))
        return value - src.take(f"{conv}/bias", path)
    if leaf == "var":
        return value + np.float32(KERAS_RESNET_BN_EPSILON - BN_EPSILON)
    return value


LEAF_RULES: dict[str, Callable] = {"torchvision": torchvision_leaf, "keras": keras_leaf}


def first_conv(arch: str) -> tuple[Path, Path, float]:
    """``(kernel path, path that absorbs the input shift, sign)`` of the stem conv."""
    if arch == "vgg16":
        return (("params", "backbone", "conv1_1", "kernel"),
                ("params", "backbone", "conv1_1", "bias"), 1.0)
    return (("params", "backbone", "conv1", "kernel"),
            ("batch_stats", "backbone", "bn1", "mean"), -1.0)


# --------------------------------------------------------------------------- convert


def convert(arrays: Mapping[str, np.ndarray], *, source: str, arch: str,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
            width: float = 1.0, depth: Sequence[int] = (), name: str = "<weights>"
            ) -> tuple[dict, dict]:
    """Converts a source's ``{name: array}`` into the tree `weights.save_pretrained` writes.

    Args:
      arrays: from `weights.read_weights` (or any mapping with the same names).
      source: 'torchvision' or 'keras' (names, layouts and input convention).
      arch: one of `ARCHS`.
      mean, std: RGB 0..255 normalisation of our pipeline (``config.data.mean/std``)
        that the converted first conv is folded for.
      width, depth: reduced variants of the models (tests only).
      name: how errors name SRC.

    Returns:
      ``(tree, report)``: ``tree = {'meta', 'params', 'batch_stats'}`` (nested dicts of
      float32 arrays), ``report = {'arrays', 'parameters', 'ignored', 'skipped'}``.
    """
    if source not in SOURCES:
        raise WeightsError(f"unknown --from={source!r}; one of {SOURCES}")
    if arch not in ARCHS:
        raise WeightsError(f"unknown --arch={arch!r}; one of {ARCHS}")
    if source == "keras" and arch not in KERAS_ARCHS:
        raise WeightsError(f"keras.applications has no {arch}; Keras archs: {KERAS_ARCHS}. "
                           f"Use --from=torchvision with a torchvision/timm state dict")
    targets = target_shapes(arch, width=width, depth=depth)
    src = Source(arrays, name)
    skipped = []
    if arch == "vgg16" and source == "keras" and not (
            src.has_prefix("fc1/") or src.has_prefix("fc2/")):
        # keras.applications.VGG16(include_top=False): no fc layers; fc6/fc7 stay fresh.
        skipped = [p for p in targets if p[1] == "largefov"]
        targets = {p: s for p, s in targets.items() if p[1] != "largefov"}
    out, missing = {}, []
    for path, shape in targets.items():
        src.taken = []
        try:
            value = LEAF_RULES[source](path, src, depth)
            value = np.asarray(value, np.float32)
        except MissingKey as e:
            missing.append(e)
            continue
        except (ValueError, IndexError) as e:
            raise WeightsError(f"{name}: cannot convert {', '.join(src.taken)} into "
                               f"{'/'.join(path)}: {e}") from e
        if value.shape != shape:
            key, got = src.taken[0], tuple(arrays[src.taken[0]].shape)
            converted = f" (converted: {value.shape})" if value.shape != got else ""
            raise WeightsError(
                f"{name}: key {key!r} has shape {got}{converted}, but {arch}'s "
                f"{'/'.join(path)} needs {shape}. Is --arch={arch} right?")
        out[path] = value
    if missing:
        raise WeightsError(
            f"{name}: key {missing[0].key!r} (for {'/'.join(missing[0].path)}) is missing"
            + (f", and {len(missing) - 1} more keys {arch} needs" if len(missing) > 1 else "")
            + (f"; SRC has none of the keys {arch} needs" if not out else "")
            + f"; SRC has {len(arrays)} keys. Are --from and --arch right?")
    kernel_path, shift_path, sign = first_conv(arch)
    out[kernel_path], shift = fold_input_convention(out[kernel_path],
                                                    INPUT_CONVENTIONS[source], mean, std)
    out[shift_path] = (out[shift_path] + sign * shift).astype(np.float32)

    leftover = sorted(k for k in arrays if k not in src.used)
    ignored = [k for k in leftover if IGNORED[source].match(k)]
    unexpected = [k for k in leftover if not IGNORED[source].match(k)]
    if unexpected:
        raise WeightsError(
            f"{name}: {len(unexpected)} keys are not used by {arch}, e.g. "
            f"{', '.join(repr(k) for k in unexpected[:3])}. Is --arch={arch} right?")
    meta = {
        "format": FORMAT, "arch": arch, "source": source, "src": os.path.basename(name),
        "input_channels": "RGB", "input_mean": [float(v) for v in mean],
        "input_std": [float(v) for v in std],
        "stride_in_1x1": None if arch == "vgg16" else source == "keras",
    }
    tree = {"meta": meta, "params": {}, "batch_stats": {}}
    for path, value in out.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    report = {"arrays": len(out), "parameters": int(sum(v.size for v in out.values())),
              "ignored": ignored, "skipped": ["/".join(p) for p in skipped]}
    return tree, report


def convert_file(src: str, dst: str, *, source: str, arch: str,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                 ) -> dict:
    """Reads SRC, converts it (`convert`) and writes DST; returns the report."""
    tree, report = convert(read_weights(src, source), source=source, arch=arch, mean=mean,
                           std=std, name=src)
    save_pretrained(dst, tree)
    return report


# --------------------------------------------------------------------------- CLI


def _triple(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"need 3 comma-separated RGB values, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scaleattn.convert",
        description="Convert ImageNet weights (torchvision .pth/.safetensors or Keras "
                    ".h5/.keras) into a parameter file for config.model.init_from.")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES,
                   help="the framework SRC comes from")
    p.add_argument("--arch", required=True, choices=ARCHS, help="the backbone")
    p.add_argument("--mean", type=_triple, default=IMAGENET_MEAN,
                   help="config.data.mean the run will use (RGB, 0..255; default ImageNet's)")
    p.add_argument("--std", type=_triple, default=IMAGENET_STD,
                   help="config.data.std the run will use (RGB, 0..255; default ImageNet's)")
    p.add_argument("src", help="source weights file")
    p.add_argument("dst", help="output file (msgpack), for config.model.init_from")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        outputs.check_file(args.dst, "DST", missing_folder_ok=True)  # before the work
        report = convert_file(args.src, args.dst, source=args.source, arch=args.arch,
                              mean=args.mean, std=args.std)
    except (WeightsError, outputs.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the disk filled up while writing DST
        print(f"error: cannot write DST={args.dst}: {e.strerror or e}", file=sys.stderr)
        return 1
    ignored = report["ignored"]
    counters = [k for k in ignored if k.endswith("num_batches_tracked")]
    shown = [k for k in ignored if k not in counters] + (
        [f"{len(counters)} x num_batches_tracked"] if counters else [])
    print(f"{args.src} ({args.source} {args.arch}) -> {args.dst}: {report['arrays']} arrays, "
          f"{report['parameters'] / 1e6:.2f}M values.")
    print(f"  not converted (not backbone): {', '.join(shown) or 'nothing'}")
    if report["skipped"]:
        print(f"  SRC has no fc layers: fc6/fc7 will be initialised fresh "
              f"({', '.join(report['skipped'])})")
    print(f"  expects RGB input normalised with data.mean={tuple(args.mean)}, "
          f"data.std={tuple(args.std)}")
    flags = [f"--config.model.init_from={args.dst}"]
    if args.arch != "vgg16":
        flags.append(f"--config.model.stride_in_1x1={args.source == 'keras'}")
    print(f"  use: {' '.join(flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
