"""Name maps: which source array each of our converted arrays comes from.

Our arrays are named by paths ``(collection, top module, module..., leaf)``, e.g.
``('params', 'backbone', 'layer1_0', 'conv2', 'kernel')`` or ``('batch_stats',
'backbone', 'bn1', 'mean')`` (module names: `models.vgg`, `models.resnet`; LargeFOV's
fc6/fc7 live under ``'largefov'``). `torchvision_name` gives the torchvision state dict
key of such a path (``'layer1.0.conv2.weight'``), `keras_name` the Keras
``'<layer>/<variable>'`` (``'conv2_block1_2_conv/kernel'``). `IGNORED` lists the
source arrays that are not part of a backbone (ImageNet classifiers, counters).
"""

import re
from typing import Sequence

from scaleattn.models import vgg

Path = tuple[str, ...]   # ('params' | 'batch_stats', 'backbone' | 'largefov', ..., leaf)

IGNORED = {   # source keys that are not part of the backbone (ImageNet classifiers ...)
    "torchvision": re.compile(r"^(fc\.(weight|bias)|classifier\.6\.(weight|bias)|"
                              r".*num_batches_tracked)$"),
    "keras": re.compile(r"^(predictions|probs)/"),
}


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

