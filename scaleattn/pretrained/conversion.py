"""Converting a source's arrays into our tree: `convert` (arrays) and `convert_file`.

Leaf by leaf, each array of our backbone (`target_shapes`, computed from the model
code) is taken from the source by name (`maps`) and brought into our layout
(`surgery`):

* torchvision: conv kernels transposed to HWIO; BN ``weight/bias/running_mean/
  running_var`` -> ``scale/bias`` (params) and ``mean/var`` (batch_stats).
* Keras: kernels are HWIO already; BN ``gamma/beta/moving_mean/moving_variance`` as
  above. ``keras.applications`` ResNet50/101 are Caffe-style: a block's stride is on
  its first 1x1 conv (the file's meta says ``stride_in_1x1=True`` and the config must
  say the same) and every conv has a bias, which our bias-free convs fold into the
  following BN: ``BN(conv(x) + b) = BN'(conv(x))`` with ``mean' = mean - b``. Keras'
  BN epsilon 1.001e-5 becomes ours (1e-5) through ``var' = var + 1e-8``.
* vgg16 (both): fc6/fc7 become LargeFOV's layers; the first conv is folded for our
  pipeline's input normalisation (`surgery.fold_input_convention`).

Errors name the file and key: a key the architecture needs that the source lacks, a
key of the source that the architecture does not use (e.g. ``--arch=resnet50`` on
ResNet-101 weights), or a shape that does not fit.
"""

import functools
import os
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scaleattn.config import IMAGENET_MEAN, IMAGENET_STD
from scaleattn.models import heads, resnet, vgg
from scaleattn.pretrained import maps, surgery
from scaleattn.pretrained.maps import Path
from scaleattn.pretrained.our_format import FORMAT, WeightsError, save_pretrained
from scaleattn.pretrained.readers import read_weights

SOURCES = ("torchvision", "keras")
ARCHS = ("vgg16", "resnet50", "resnet101", "resnext101_32x4d", "resnext101_32x8d")
KERAS_ARCHS = ("vgg16", "resnet50", "resnet101")   # what keras.applications offers


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
    """A jax tree path (``DictKey`` entries) -> our tuple of strings."""
    return tuple(str(getattr(k, "key", k)) for k in path)


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
        """The array ``key`` (for our ``for_path``); `MissingKey` if SRC lacks it."""
        if key not in self.arrays:
            raise MissingKey(key, for_path)
        self.used.add(key)
        self.taken.append(key)
        return self.arrays[key]

    def has_prefix(self, prefix: str) -> bool:
        """Whether any key of SRC starts with ``prefix`` (e.g. Keras' 'fc1/')."""
        return any(k.startswith(prefix) for k in self.arrays)



def largefov_leaf(path: Path, src: Source, name_of: Callable[[Path], str],
                  fc_as_conv: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """LargeFOV's fc6 or fc7 ``kernel`` / ``bias`` (``path[2]``) from VGG16's fully
    connected layer: ``name_of`` names its weight and bias in the source, ``fc_as_conv``
    turns the weight into a conv kernel (``[7, 7, C, 4096]`` / ``[1, 1, 4096, 4096]``)
    and `surgery.LARGEFOV_SURGERY` cuts it down (``[3, 3, C, 1024]`` /
    ``[1, 1, 1024, 1024]``, bias ``[1024]``)."""
    layer = path[2]
    w = src.take(name_of(path[:-1] + ("kernel",)), path)
    b = src.take(name_of(path[:-1] + ("bias",)), path)
    kernel, bias = surgery.LARGEFOV_SURGERY[layer](fc_as_conv(w, surgery.FC_SIZES[layer]), b)
    return bias if path[-1] == "bias" else kernel


def torchvision_leaf(path: Path, src: Source, depth: Sequence[int]) -> np.ndarray:
    """One of our arrays from a torchvision state dict (before input folding)."""
    name_of = functools.partial(maps.torchvision_name, depth=depth)
    if path[2] in surgery.FC_SIZES:
        return largefov_leaf(path, src, name_of, surgery.fc_as_conv_from_torch)
    value = src.take(name_of(path), path)
    return surgery.conv_kernel_from_torch(value) if path[-1] == "kernel" else value


def keras_leaf(path: Path, src: Source, depth: Sequence[int]) -> np.ndarray:
    """One of our arrays from Keras weights (before input folding); BN statistics
    absorb the preceding conv's bias and Keras' BN epsilon."""
    del depth
    if path[2] in surgery.FC_SIZES:
        return largefov_leaf(path, src, maps.keras_name, surgery.fc_as_conv_from_keras)
    modules, leaf = path[2:-1], path[-1]
    value = src.take(maps.keras_name(path), path)
    if leaf == "mean":
        conv = maps.keras_layer(modules[:-1] + (maps.paired_conv(modules[-1]),))
        return value - src.take(f"{conv}/bias", path)
    if leaf == "var":
        return value + np.float32(surgery.KERAS_RESNET_BN_EPSILON - surgery.BN_EPSILON)
    return value


LEAF_RULES: dict[str, Callable] = {"torchvision": torchvision_leaf, "keras": keras_leaf}


def convert(arrays: Mapping[str, np.ndarray], *, source: str, arch: str,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
            width: float = 1.0, depth: Sequence[int] = (), name: str = "<weights>"
            ) -> tuple[dict, dict]:
    """Converts a source's ``{name: array}`` into the tree `save_pretrained` writes.

    Args:
      arrays: from `read_weights` (or any mapping with the same names).
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
    kernel_path, shift_path, sign = surgery.first_conv(arch)
    out[kernel_path], shift = surgery.fold_input_convention(
        out[kernel_path], surgery.INPUT_CONVENTIONS[source], mean, std)
    out[shift_path] = (out[shift_path] + sign * shift).astype(np.float32)

    leftover = sorted(k for k in arrays if k not in src.used)
    ignored = [k for k in leftover if maps.IGNORED[source].match(k)]
    unexpected = [k for k in leftover if not maps.IGNORED[source].match(k)]
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
