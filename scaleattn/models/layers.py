"""Building blocks shared by every model: padded convolutions, batch norm, resizing.

Conventions every model in `scaleattn.models` follows (other modules rely on them):

* Layout is NHWC; kernels are HWIO (Flax's default).
* Convolutions pad symmetrically by ``dilation * (kernel - 1) // 2`` on each side,
  as Caffe and PyTorch do, so that weights converted from either give the same
  feature maps and odd input sizes (321, 513) map to the DeepLab sizes (41, 65).
* Every batch-norm layer is a `flax.linen.BatchNorm` whose module name starts with
  ``bn`` (``bn1``, ``bn_proj`` ...). The optimiser finds batch-norm parameters by
  that name to freeze them when ``bn_mode == 'frozen'``.
* Resizing is done with interpolation matrices (`resize_bilinear`): two einsums
  that run on the MXU / tensor cores, with DeepLab's ``align_corners=True``
  geometry (corner pixels map onto corner pixels).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

BN_MODES = ("frozen", "train")

# He-normal on fan_out, as torchvision initialises ResNet/VGG convolutions.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def same_padding(kernel_size: int, dilation: int = 1):
    """Symmetric padding that keeps the size of a stride-1 convolution."""
    pad = dilation * (kernel_size - 1) // 2
    return ((pad, pad), (pad, pad))


def conv(features: int, kernel_size: int = 3, *, stride: int = 1, dilation: int = 1,
         groups: int = 1, use_bias: bool = False, dtype: Any = jnp.float32,
         kernel_init=he_normal, name: str | None = None) -> nn.Conv:
    """A 2-D convolution with symmetric ('Caffe/PyTorch') padding.

    Input ``[B, H, W, Cin]`` -> output ``[B, ceil(H / stride), ceil(W / stride), features]``
    for odd kernel sizes.
    """
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=same_padding(kernel_size, dilation),
                   kernel_dilation=(dilation, dilation), feature_group_count=groups,
                   use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name)


def batch_norm(*, train: bool, bn_mode: str, axis_name: str | None = None,
               dtype: Any = jnp.float32, name: str) -> nn.BatchNorm:
    """Batch norm that is frozen (running statistics, fixed affine) or trained.

    With ``bn_mode == 'train'`` and ``train=True`` the batch statistics are used and
    synchronised over ``axis_name`` (the pmap axis) when one is given; under `jit` on
    global (sharded) arrays they are global already. ``name`` must start with ``bn``.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if not name.startswith("bn"):
        raise ValueError(f"batch-norm module names must start with 'bn', got {name!r}")
    use_batch_stats = train and bn_mode == "train"
    return nn.BatchNorm(use_running_average=not use_batch_stats, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name if use_batch_stats else None, dtype=dtype,
                        name=name)


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Linear-interpolation matrix ``M`` of shape ``[out_size, in_size]`` (align_corners).

    ``y = M @ x`` resamples a 1-D signal ``x`` of length ``in_size`` to ``out_size``
    samples, output sample ``i`` sitting at input coordinate ``i * (in - 1) / (out - 1)``.
    """
    m = np.zeros((out_size, in_size), np.float32)
    if in_size == 1 or out_size == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, in_size - 2)
    frac = (pos - lo).astype(np.float32)
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), lo + 1] += frac
    return m


def resize_bilinear(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
    """Bilinear resize of ``[B, H, W, C]`` to ``[B, size[0], size[1], C]`` (align_corners).

    No antialiasing: the same as Caffe's ``Interp`` layer that DeepLab uses to shrink
    the input for the 0.75 and 0.5 scales and to grow score maps.
    """
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return x
    mh = jnp.asarray(interpolation_matrix(h, out_h), x.dtype)
    mw = jnp.asarray(interpolation_matrix(w, out_w), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x)
    return jnp.einsum("pw,bowc->bopc", mw, x)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output sample for nearest resizing (align_corners)."""
    if out_size == 1:
        return np.zeros((1,), np.int32)
    return np.round(np.arange(out_size) * (in_size - 1) / (out_size - 1)).astype(np.int32)


def resize_nearest(labels: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
    """Nearest resize of an integer map ``[B, H, W]`` to ``[B, size[0], size[1]]``.

    Picks input pixel ``round(i * (H - 1) / (h - 1))``: for a stride-8 DeepLab on a
    321 crop (41 outputs) this is every 8th pixel, the centre of each output cell.
    """
    h, w = labels.shape[1], labels.shape[2]
    if (h, w) == tuple(size):
        return labels
    rows = nearest_indices(h, int(size[0]))
    cols = nearest_indices(w, int(size[1]))
    return labels[:, rows][:, :, cols]


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """Input size of the branch at ``scale``: ``ceil(size * scale)`` (321 -> 241, 161)."""
    return tuple(int(np.ceil(s * scale - 1e-6)) for s in size)
