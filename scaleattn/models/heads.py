"""Segmentation heads: backbone features -> per-class score maps.

Every head follows one contract, which the scale-attention wrapper relies on:
``head(features [B, h, w, Cin], *, train) -> {'logits': [B, h, w, num_classes],
'features': [B, h, w, Cpen]}``, where ``features`` is the penultimate representation
(what the final classifier reads; the attention head of `scale_attention` consumes it).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaleattn.models import layers

# DeepLab initialises its new classifiers with N(0, 0.01).
classifier_init = nn.initializers.normal(0.01)


class LargeFOVHead(nn.Module):
    """DeepLab-LargeFOV's fc6 (3x3, dilation 12) -> fc7 (1x1) -> fc8 (1x1 classifier).

    fc6 and fc7 have ``fc_width`` (1024) channels, each followed by ReLU and dropout;
    ``features`` is fc7 after its dropout (the blob the paper's attention head reads).
    """
    num_classes: int
    fc_width: int = 1024
    fc6_dilation: int = 12
    dropout: float = 0.5
    width: float = 1.0
    dtype: Any = jnp.float32
    dilated_conv: str = "native"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> dict:
        channels = max(1, int(self.fc_width * self.width))
        x = layers.conv(channels, 3, dilation=self.fc6_dilation, use_bias=True,
                        dtype=self.dtype, dilated_conv=self.dilated_conv, name="fc6")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        x = layers.conv(channels, 1, use_bias=True, dtype=self.dtype, name="fc7")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                             kernel_init=classifier_init, name="fc8")(x)
        return {"logits": logits, "features": x}


class ASPPv2Head(nn.Module):
    """DeepLab-v2's ASPP: the sum of four 3x3 classifiers with dilations 6/12/18/24.

    Each branch maps the backbone features straight to class scores; ``features`` is
    the head's input (ResNet's last stage), the representation the branches read.
    """
    num_classes: int
    rates: Sequence[int] = (6, 12, 18, 24)
    dtype: Any = jnp.float32
    dilated_conv: str = "native"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> dict:
        del train
        logits = sum(
            layers.conv(self.num_classes, 3, dilation=rate, use_bias=True, dtype=self.dtype,
                        kernel_init=classifier_init, dilated_conv=self.dilated_conv,
                        name=f"aspp_r{rate}")(x)
            for rate in self.rates)
        return {"logits": logits, "features": x}
