"""ResNet v1 and ResNeXt with bottleneck blocks, dilated for dense prediction.

One module, `ResNet`, covers torchvision's ``resnet50``, ``resnet101``,
``resnext101_32x4d`` and ``resnext101_32x8d`` (`resnet` builds them by name):

* stem: 7x7/2 convolution, BN, ReLU, 3x3/2 max pool (padding 1);
* four stages of bottleneck blocks ``1x1 -> 3x3 (grouped for ResNeXt) -> 1x1``, each
  conv followed by BN, the sum with the shortcut followed by ReLU. The first block of a
  stage projects its shortcut (1x1 conv with the block's stride, then BN) whenever the
  stride or the channel count changes. Bottleneck width, as in torchvision:
  ``int(planes * width_per_group / 64) * groups`` with ``planes`` = 64, 128, 256, 512
  and ``4 * planes`` output channels.
* ``output_stride`` 8 or 16 replaces the stride of the last stages by dilation
  (`stage_layout`). As in DeepLab (Caffe ResNet-101) and DeepLab-v3's multi-grid, every
  block of a dilated stage, the first included, uses the stage's full rate; the last
  stage's block ``j`` uses ``rate * multi_grid[j]``. (torchvision's
  ``replace_stride_with_dilation`` keeps the previous rate in a stage's first block.)
* Every convolution pads symmetrically (`layers.conv`), so an ``H x W`` input gives a
  ``ceil(H / os) x ceil(W / os)`` map: 513 -> 65 at output stride 8, 321 -> 41.

Parameter names mirror torchvision's state dict, so converting weights is a table:

  ==================================  ============================================
  torchvision                         here (``params`` / ``batch_stats``)
  ==================================  ============================================
  ``conv1.weight``                    ``conv1/kernel``
  ``bn1.weight``, ``bn1.bias``        ``bn1/scale``, ``bn1/bias``
  ``bn1.running_mean``, ``..._var``   ``bn1/mean``, ``bn1/var`` (batch_stats)
  ``layer{s}.{b}.conv{i}.weight``     ``layer{s}_{b}/conv{i}/kernel`` (i = 1, 2, 3)
  ``layer{s}.{b}.bn{i}.*``            ``layer{s}_{b}/bn{i}/*``
  ``layer{s}.{b}.downsample.0.*``     ``layer{s}_{b}/downsample_conv/kernel``
  ``layer{s}.{b}.downsample.1.*``     ``layer{s}_{b}/bn_downsample/*``
  ``fc.weight``, ``fc.bias``          ``fc/kernel``, ``fc/bias`` (``num_classes`` only)
  ==================================  ============================================

with ``s`` in 1..4 and ``b`` counting from 0. Convolution kernels are HWIO (torch
OIHW -> ``transpose(2, 3, 1, 0)``; a grouped kernel is ``[3, 3, Cin / groups, Cout]``
in both layouts' group order), the fc kernel is ``weight.T``. No convolution has a bias.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaleattn.models import layers

EXPANSION = 4                      # bottleneck output channels = EXPANSION * planes
STAGE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64

ARCHITECTURES = {
    "resnet50": dict(stage_sizes=(3, 4, 6, 3)),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3)),
    "resnext101_32x4d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=8),
}

# (stride, dilation) of the four stages for each output stride.
_STAGE_STRIDES = {
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, at least 1 (as `vgg` and `heads` do)."""
    return max(1, int(channels * width))


def stage_layout(stage_sizes: Sequence[int], output_stride: int,
                 multi_grid: Sequence[int] = ()) -> list[list[tuple[int, int]]]:
    """``(stride, dilation)`` of the 3x3 conv of every block, one list per stage.

    E.g. ``stage_layout((3, 4, 23, 3), 8, (1, 2, 4))[3] == [(1, 4), (1, 8), (1, 16)]``.
    Only a stage's first block can have stride 2.
    """
    if output_stride not in _STAGE_STRIDES:
        raise ValueError(f"ResNet output_stride must be one of {sorted(_STAGE_STRIDES)}, "
                         f"got {output_stride}")
    if len(stage_sizes) != 4:
        raise ValueError(f"ResNet needs 4 stages, got stage_sizes={tuple(stage_sizes)}")
    if multi_grid and len(multi_grid) != stage_sizes[-1]:
        raise ValueError(f"multi_grid={tuple(multi_grid)} needs one rate per block of the "
                         f"last stage ({stage_sizes[-1]} blocks); use () for none")
    layout = []
    for stage, (blocks, (stride, rate)) in enumerate(
            zip(stage_sizes, _STAGE_STRIDES[output_stride])):
        grid = multi_grid if (multi_grid and stage == 3) else (1,) * blocks
        layout.append([(stride if b == 0 else 1, rate * grid[b]) for b in range(blocks)])
    return layout


class Bottleneck(nn.Module):
    """``[B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), out_channels]``.

    Attributes:
      inner_channels: channels of the 1x1 reduction and the 3x3 conv (divisible by groups).
      out_channels: channels of the 1x1 expansion and of the block's output.
      groups: groups of the 3x3 conv (32 for ResNeXt).
      stride, dilation: of the block; the stride sits on the 3x3 conv, or on the first
        1x1 conv with ``stride_in_1x1`` (Caffe/MSRA ResNet).
    """
    inner_channels: int
    out_channels: int
    groups: int = 1
    stride: int = 1
    dilation: int = 1
    stride_in_1x1: bool = False
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    dilated_conv: str = "native"
    fold_bn: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        def conv_bn(y, features, kernel_size, conv_name, bn_name, **kwargs):
            return layers.conv_bn(y, features, kernel_size, train=train, bn_mode=self.bn_mode,
                                  axis_name=self.bn_axis_name, fold=self.fold_bn,
                                  conv_name=conv_name, bn_name=bn_name, dtype=self.dtype,
                                  **kwargs)

        stride_1x1, stride_3x3 = ((self.stride, 1) if self.stride_in_1x1 else (1, self.stride))
        y = nn.relu(conv_bn(x, self.inner_channels, 1, "conv1", "bn1", stride=stride_1x1))
        y = nn.relu(conv_bn(y, self.inner_channels, 3, "conv2", "bn2", stride=stride_3x3,
                            dilation=self.dilation, groups=self.groups,
                            dilated_conv=self.dilated_conv))
        y = conv_bn(y, self.out_channels, 1, "conv3", "bn3")

        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            shortcut = conv_bn(x, self.out_channels, 1, "downsample_conv", "bn_downsample",
                               stride=self.stride)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet v1 / ResNeXt trunk: ``[B, H, W, 3] -> [B, ceil(H/os), ceil(W/os), C]``.

    ``C = 2048 * width``; with ``num_classes`` set, global average pooling and a dense
    layer give ImageNet logits ``[B, num_classes]`` instead (torchvision's classifier,
    used to check parameter counts and to hold converted ``fc`` weights).

    Attributes:
      stage_sizes: bottleneck blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
      groups: groups of each block's 3x3 conv (1 for ResNet, 32 for ResNeXt).
      width_per_group: channels per group of the 3x3 conv at planes = 64 (64 for ResNet,
        4 or 8 for ResNeXt 32x4d / 32x8d).
      width: channel multiplier for every layer (1.0 = standard; tests use e.g. 1/16).
        For grouped convs it scales the channels per group, and the number of groups
        stays.
      output_stride: 8, 16 or 32 (see `stage_layout`).
      multi_grid: per-block rate multipliers of the last stage, e.g. (1, 2, 4); () = none.
      stride_in_1x1: put a block's stride on its first 1x1 conv (Caffe) instead of on
        the 3x3 conv (torchvision, False).
      bn_mode: 'frozen' (running statistics always) or 'train' (batch statistics when
        ``train``); see `layers.batch_norm`.
      bn_axis_name: pmap axis over which batch statistics are averaged, or None.
      dilated_conv: how the dilated 3x3 convs run (`layers.conv`).
      fold_bn: fold each batch norm into the convolution before it where its
        statistics are constants (`layers.conv_bn`); same function and parameters.
      remat: recompute each bottleneck block's activations in the backward pass
        instead of keeping them (``nn.remat``): less memory, about one more forward.
      num_classes: None for segmentation (feature map out), else classifier logits.
    """
    stage_sizes: Sequence[int]
    groups: int = 1
    width_per_group: int = 64
    width: float = 1.0
    output_stride: int = 8
    multi_grid: Sequence[int] = ()
    stride_in_1x1: bool = False
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    dilated_conv: str = "native"
    fold_bn: bool = True
    remat: bool = False
    num_classes: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        layout = stage_layout(self.stage_sizes, self.output_stride, self.multi_grid)
        x = layers.conv_bn(x, scaled(STEM_CHANNELS, self.width), 7, stride=2, train=train,
                           bn_mode=self.bn_mode, axis_name=self.bn_axis_name,
                           fold=self.fold_bn, conv_name="conv1", bn_name="bn1",
                           dtype=self.dtype)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
        for stage, (planes, blocks) in enumerate(zip(STAGE_PLANES, layout), start=1):
            group_width = scaled(planes * self.width_per_group // 64, self.width)
            for b, (stride, dilation) in enumerate(blocks):
                x = block_cls(inner_channels=group_width * self.groups,
                              out_channels=scaled(planes * EXPANSION, self.width),
                              groups=self.groups, stride=stride, dilation=dilation,
                              stride_in_1x1=self.stride_in_1x1, bn_mode=self.bn_mode,
                              bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                              dilated_conv=self.dilated_conv, fold_bn=self.fold_bn,
                              name=f"layer{stage}_{b}")(x, train)

        if self.num_classes is None:
            return x
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def resnet(arch: str, /, *, depth: Sequence[int] = (), **kwargs) -> ResNet:
    """The `ResNet` called ``arch`` ('resnet50', 'resnet101', 'resnext101_32x4d', ...).

    ``depth`` (blocks per stage, e.g. (1, 1, 1, 1) in tests) replaces the standard one
    when not empty; ``kwargs`` are `ResNet` attributes (``width``, ``output_stride``,
    ``bn_mode`` ...) or the Flax ``name`` / ``parent``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown ResNet architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    attrs = dict(ARCHITECTURES[arch])
    if depth:
        attrs["stage_sizes"] = tuple(depth)
    return ResNet(**attrs, **kwargs)
