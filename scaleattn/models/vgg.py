"""VGG16 as DeepLab-LargeFOV uses it (Chen et al., ICLR 2015 / CVPR 2016).

The thirteen 3x3 convolutions of VGG16 with two changes that keep the output stride
at 8: pool4 and pool5 have stride 1, and conv5 is dilated by 2. All pools are 3x3
with padding 1 (a 321 crop gives 161, 81, 41), and pool5 is followed by the 3x3
average pool `pool5a` of the LargeFOV prototxt. The fully connected layers fc6/fc7
and the classifier fc8 live in `heads.LargeFOVHead`.

Module names are Caffe's (`conv1_1` ... `conv5_3`) so converted weights map by name.

``batch_norm=True`` puts a batch norm (``bn1_1`` ... ``bn5_3``) between every trunk
convolution and its ReLU, as torchvision's ``vgg16_bn`` does; the convolutions then
have no bias (the batch norm's offset takes its place; torchvision keeps both). It is
for training from scratch (the demo): there is no converted ImageNet file of it.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaleattn.models import layers

VGG16_DEPTH = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)


class VGG16(nn.Module):
    """VGG16 trunk, output stride 8: ``[B, H, W, 3] -> [B, ceil(H/8), ceil(W/8), 512*width]``.

    Attributes:
      width: channel multiplier (1.0 = VGG16; tests use e.g. 1/16).
      depth: convolutions per block; ``()`` is VGG16's (2, 2, 3, 3, 3).
      output_stride: must be 8 (the LargeFOV layout); kept as an argument so that a
        config asking for another stride fails loudly instead of being ignored.
      batch_norm: a batch norm after every convolution (`layers.conv_bn`), with
        ``bn_mode`` ('frozen' | 'train'), ``bn_axis_name`` (the axis batch statistics
        are averaged over, or None) and ``fold_bn`` (fold it into the convolution
        where its statistics are constants).
    """
    width: float = 1.0
    depth: Sequence[int] = ()
    output_stride: int = 8
    dtype: Any = jnp.float32
    dilated_conv: str = "native"
    batch_norm: bool = False
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    fold_bn: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.output_stride != 8:
            raise ValueError(f"VGG16-LargeFOV has output stride 8, got model.output_stride="
                             f"{self.output_stride}")
        depth = tuple(self.depth) or VGG16_DEPTH
        if len(depth) != 5:
            raise ValueError(f"VGG16 depth needs 5 blocks, got model.depth={depth}")
        for block, (convs, channels) in enumerate(zip(depth, VGG16_WIDTHS), start=1):
            dilation = 2 if block == 5 else 1
            for i in range(1, convs + 1):
                features = max(1, int(channels * self.width))
                if self.batch_norm:
                    x = layers.conv_bn(x, features, 3, train=train, bn_mode=self.bn_mode,
                                       axis_name=self.bn_axis_name, fold=self.fold_bn,
                                       conv_name=f"conv{block}_{i}", bn_name=f"bn{block}_{i}",
                                       dilation=dilation, dtype=self.dtype,
                                       dilated_conv=self.dilated_conv)
                else:
                    x = layers.conv(features, 3, dilation=dilation, use_bias=True,
                                    dtype=self.dtype, dilated_conv=self.dilated_conv,
                                    name=f"conv{block}_{i}")(x)
                x = nn.relu(x)
            stride = 2 if block <= 3 else 1
            x = nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
        # pool5a: 3x3 average pool, stride 1 (padding counted, as in Caffe).
        return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                           count_include_pad=True)
