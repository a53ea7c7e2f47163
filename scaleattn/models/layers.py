"""Building blocks shared by every model: padded convolutions, batch norm, resizing.

Conventions every model in `scaleattn.models` follows (other modules rely on them):

* Layout is NHWC; kernels are HWIO (Flax's default).
* Convolutions pad symmetrically by ``dilation * (kernel - 1) // 2`` on each side,
  as Caffe and PyTorch do, so that weights converted from either give the same
  feature maps and odd input sizes (321, 513) map to the DeepLab sizes (41, 65).
* Every batch-norm layer is a `flax.linen.BatchNorm` whose module name starts with
  ``bn`` (``bn1``, ``bn_proj`` ...). The optimiser finds batch-norm parameters by
  that name to freeze them when ``bn_mode == 'frozen'``.
* A dilated convolution can be computed three exact ways (``dilated_conv``, see
  `DilatedConv`): XLA's native dilated convolution, space-to-batch, or one 1x1
  convolution over all taps followed by shifted adds. All give the same parameters
  (``kernel`` ``[k, k, Cin / groups, Cout]``, ``bias``) under the same names.
  ``'auto'`` picks one per platform (`resolve_dilated_conv`, `DILATED_CONV_AUTO`).
* A convolution followed by batch norm goes through `conv_bn`. Where the statistics
  are constants in the call (frozen batch norm, or any batch norm at inference) and
  ``fold`` is set, the normalisation is folded into the convolution: ``conv(x, kernel
  * s) + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``, the
  parameters unchanged (`BatchNormConstants`).
* Resizing is done with interpolation matrices (`resize_bilinear`): two einsums
  that run on the MXU / tensor cores, with DeepLab's ``align_corners=True``
  geometry (corner pixels map onto corner pixels).
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scaleattn import config as config_lib

BN_EPSILON = 1e-5
# The concrete lowerings ('auto' resolves to one of them).
DILATED_CONV_IMPLS = tuple(c for c in config_lib.CHOICES["model.dilated_conv"] if c != "auto")

# model.dilated_conv='auto': per platform (`jax.default_backend()`), the lowering that
# measured fastest, with the measurement that decided it. A platform that is not here
# gets 'native'.
DILATED_CONV_AUTO = {
    "cpu": ("native", "README, 'Where the time goes': fp32 train and eval img/s of "
                      "VGG16-LargeFOV and ResNet-101-ASPP, native / space_to_batch / taps, "
                      "2-core CPU, commit 9129f0c; native fastest except ResNet eval (taps)"),
    "gpu": ("space_to_batch",
            "docs/performance.md, 'On a GPU': the three timed in one process on an H200, "
            "bf16, ResNet-101-ASPP x3 scales, batch 8 x 321 (2026-12-04, commit 73e3657): "
            "train img/s native 127.3, space_to_batch 208.5, taps 190.2; eval within 4%"),
    "tpu": ("native", "not measured yet: XLA's own lowering until the three are timed "
                      "(--config.bench.dilated_convs) on a TPU"),
}
POINTWISE_CONV_IMPLS = ("matmul", "conv")  # not a config key: chosen per layer in code

# He-normal on fan_out, as torchvision initialises ResNet/VGG convolutions.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_dilated_conv(name: str, platform: str | None = None) -> str:
    """A concrete lowering for ``model.dilated_conv``: ``'auto'`` becomes the entry of
    `DILATED_CONV_AUTO` for ``platform`` (default ``jax.default_backend()``), any
    other value is returned as it is (after a check)."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return DILATED_CONV_AUTO.get(platform, ("native", ""))[0]
    config_lib.check_choice("model.dilated_conv", name)
    return name


def same_padding(kernel_size: int, dilation: int = 1):
    """Symmetric padding that keeps the size of a stride-1 convolution."""
    pad = dilation * (kernel_size - 1) // 2
    return ((pad, pad), (pad, pad))


def conv(features: int, kernel_size: int = 3, *, stride: int = 1, dilation: int = 1,
         groups: int = 1, use_bias: bool = False, dtype: Any = jnp.float32,
         kernel_init=he_normal, dilated_conv: str = "native",
         pointwise_conv: str = "matmul", scalable: bool = False,
         name: str | None = None) -> nn.Module:
    """A 2-D convolution with symmetric ('Caffe/PyTorch') padding.

    Input ``[B, H, W, Cin]`` -> output ``[B, ceil(H / stride), ceil(W / stride), features]``
    for odd kernel sizes. A dilated one (``dilation > 1``) is lowered as
    ``dilated_conv`` says (`DilatedConv`; ``'auto'``: `resolve_dilated_conv`); an
    ungrouped 1x1 one as a matrix product (`PointwiseConv`) with
    ``pointwise_conv='matmul'``, else as a convolution. The parameters are the same
    either way. With ``scalable`` the module's call takes an optional per-channel
    ``scale [features]`` that multiplies its kernel and bias (`conv_bn`); the
    lowerings other than XLA's native one always take it.
    """
    if pointwise_conv not in POINTWISE_CONV_IMPLS:
        raise ValueError(f"pointwise_conv must be one of {POINTWISE_CONV_IMPLS}, "
                         f"got {pointwise_conv!r}")
    dilated_conv = resolve_dilated_conv(dilated_conv)
    if kernel_size == 1 and groups == 1 and pointwise_conv == "matmul":
        return PointwiseConv(features, stride=stride, use_bias=use_bias, dtype=dtype,
                             kernel_init=kernel_init, name=name)
    if dilation > 1 and dilated_conv != "native":
        if stride != 1:
            raise ValueError("a dilated convolution must have stride 1")
        return DilatedConv(features, kernel_size, dilation=dilation, groups=groups,
                           use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                           impl=dilated_conv, name=name)
    return (Conv if scalable else nn.Conv)(
        features, (kernel_size, kernel_size), strides=(stride, stride),
        padding=same_padding(kernel_size, dilation), kernel_dilation=(dilation, dilation),
        feature_group_count=groups, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
        name=name)


def conv_parameters(module: nn.Module, x: jnp.ndarray, kernel_shape: Sequence[int],
                    scale: jnp.ndarray | None = None):
    """Declares ``kernel`` (``module.kernel_init``) and, with ``module.use_bias``, a zero
    ``bias`` as `nn.Conv` does (same names, order, float32), and returns ``(x, kernel,
    bias)`` promoted to ``module.dtype`` (``bias`` None without one). A ``scale
    [Cout]`` multiplies kernel and bias per output channel first (in float32), so that
    the convolution computes ``conv(x) * scale``."""
    kernel = module.param("kernel", module.kernel_init, tuple(kernel_shape), jnp.float32)
    bias = (module.param("bias", nn.initializers.zeros_init(), (kernel_shape[-1],),
                         jnp.float32) if module.use_bias else None)
    if scale is not None:
        kernel = kernel * scale
        bias = None if bias is None else bias * scale
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)


def add_bias(y: jnp.ndarray, bias: jnp.ndarray | None) -> jnp.ndarray:
    return y if bias is None else y + bias


class PointwiseConv(nn.Module):
    """A 1x1 convolution as a matrix product over channels (``einsum``), with the
    parameters of `nn.Conv` (``kernel [1, 1, Cin, Cout]``, ``bias``); a stride keeps
    every ``stride``-th pixel, which is what a 1x1 kernel without padding reads.

    The same function as the convolution; what differs is the backward pass: the
    kernel gradient is one matrix product over ``B * H * W``, where XLA's CPU backend
    transposes both operands of a convolution's kernel gradient first (24% of a
    ResNet-101 train step there, measured with ``--config.bench.profile_dir``).
    """
    features: int
    stride: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Callable = he_normal

    @nn.compact
    def __call__(self, x: jnp.ndarray, scale: jnp.ndarray | None = None) -> jnp.ndarray:
        x, kernel, bias = conv_parameters(self, x, (1, 1, x.shape[-1], self.features), scale)
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride]
        return add_bias(jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0]), bias)


class Conv(nn.Conv):
    """`nn.Conv` (its attributes, parameters and initial values) whose call also takes
    an optional per-channel ``scale [features]`` that multiplies the kernel and bias
    before the convolution (`conv_bn` folds a batch norm with it): ``[B, H, W, Cin] ->
    [B, H', W', features]``. Without ``scale`` it computes what `nn.Conv` does. For the
    convolutions `conv` builds: a 2-D kernel, explicit padding pairs, strides, kernel
    dilation, groups, optional bias.
    """

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, scale: jnp.ndarray | None = None) -> jnp.ndarray:
        if (isinstance(self.padding, str) or np.any(np.asarray(self.input_dilation or 1) != 1)
                or self.mask is not None):
            raise ValueError("layers.Conv takes explicit padding pairs, no input dilation "
                             "and no mask")
        kernel_shape = (*self.kernel_size, inputs.shape[-1] // self.feature_group_count,
                        self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        if scale is not None:
            kernel = kernel * scale
            bias = None if bias is None else bias * scale
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            inputs, kernel, self.strides, self.padding, rhs_dilation=self.kernel_dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.feature_group_count, precision=self.precision)
        return add_bias(y, bias)


def space_to_batch(x: jnp.ndarray, rate: int) -> jnp.ndarray:
    """``[B, H, W, C] -> [rate² B, ceil(H / rate), ceil(W / rate), C]``.

    Pads H and W with zeros at the end to multiples of ``rate``, then gathers every
    ``rate``-th pixel into a sub-image: sub-image ``(p, q)`` (batch index
    ``(p * rate + q) * B + b``) holds pixels ``(p + rate * i, q + rate * j)``.
    """
    b, h, w, c = x.shape
    hs, ws = -(-h // rate), -(-w // rate)
    x = jnp.pad(x, ((0, 0), (0, hs * rate - h), (0, ws * rate - w), (0, 0)))
    x = x.reshape(b, hs, rate, ws, rate, c).transpose(2, 4, 0, 1, 3, 5)
    return x.reshape(rate * rate * b, hs, ws, c)


def batch_to_space(y: jnp.ndarray, rate: int, size: Sequence[int]) -> jnp.ndarray:
    """Inverse of `space_to_batch`: ``[rate² B, hs, ws, C] -> [B, size[0], size[1], C]``."""
    n, hs, ws, c = y.shape
    b = n // (rate * rate)
    y = y.reshape(rate, rate, b, hs, ws, c).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(b, hs * rate, ws * rate, c)[:, :size[0], :size[1]]


def live_taps(kernel_size: int, dilation: int, size: int) -> list[int]:
    """Kernel taps ``i`` (0..k-1) whose offset ``dilation * (i - k // 2)`` still lands
    inside a length-``size`` axis for some output pixel; the others only ever read the
    zero padding and contribute nothing."""
    centre = kernel_size // 2
    return [i for i in range(kernel_size) if abs(dilation * (i - centre)) < size]


class DilatedConv(nn.Module):
    """A stride-1 dilated convolution computed without a dilated kernel.

    Same contract and parameters as ``layers.conv(..., dilation=d)`` with
    ``impl='native'``: ``[B, H, W, Cin] -> [B, H, W, features]``, zero padding
    ``d * (k - 1) // 2`` on each side, ``kernel [k, k, Cin / groups, features]``.
    Both lowerings are exact (the tests compare them with XLA's dilated conv):

    * ``'space_to_batch'``: a rate-d convolution reads only pixels ``d`` apart, so
      it is an ordinary (undilated) convolution on each of the d² interleaved
      sub-images (`space_to_batch`), zero-padded at the end to multiples of d; the
      padding plays the role of the original zero border. XLA otherwise may lower a
      dilated kernel as a zero-filled ``(d (k-1) + 1)²`` one (docs/design.md,
      "Dilated convolutions on accelerators").
    * ``'taps'``: one 1x1 convolution (a matrix product) from ``Cin`` to
      ``k² * features`` channels, then the k² shifted slices are added. Taps that
      fall wholly in the padding (`live_taps`: rate >= the feature map) are
      dropped from the product. Suited to few output channels (ASPP's
      classifiers); ``groups`` must be 1.
    """
    features: int
    kernel_size: int = 3
    dilation: int = 2
    groups: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Callable = he_normal
    impl: str = "space_to_batch"

    @nn.compact
    def __call__(self, x: jnp.ndarray, scale: jnp.ndarray | None = None) -> jnp.ndarray:
        k, d = self.kernel_size, self.dilation
        if self.impl not in DILATED_CONV_IMPLS[1:]:
            raise ValueError(f"DilatedConv implements model.dilated_conv in "
                             f"{DILATED_CONV_IMPLS[1:]} (native "
                             f"convolutions use nn.Conv), got {self.impl!r}")
        if k % 2 != 1:
            raise ValueError(f"DilatedConv needs an odd kernel size, got {k}")
        x, kernel, bias = conv_parameters(
            self, x, (k, k, x.shape[-1] // self.groups, self.features), scale)
        if self.impl == "space_to_batch":
            y = jax.lax.conv_general_dilated(
                space_to_batch(x, d), kernel, (1, 1), same_padding(k),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups)
            y = batch_to_space(y, d, x.shape[1:3])
        else:
            y = taps_conv(x, kernel, d, self.groups)
        return add_bias(y, bias)


def taps_conv(x: jnp.ndarray, kernel: jnp.ndarray, dilation: int, groups: int = 1):
    """``x [B, H, W, Cin]``, ``kernel [k, k, Cin, Cout]`` -> ``[B, H, W, Cout]``: the
    dilated convolution as one product with the live taps' kernels, then shifted adds."""
    if groups != 1:
        raise ValueError("dilated_conv='taps' does not support grouped convolutions")
    b, h, w, _ = x.shape
    k, cout = kernel.shape[0], kernel.shape[-1]
    rows, cols = live_taps(k, dilation, h), live_taps(k, dilation, w)
    taps = [(i, j) for i in rows for j in cols]
    stacked = jnp.concatenate([kernel[i, j] for i, j in taps], axis=-1)  # [Cin, T * Cout]
    products = jnp.einsum("bhwc,cn->bhwn", x, stacked)
    pad_h, pad_w = dilation * (max(rows) - k // 2), dilation * (max(cols) - k // 2)
    products = jnp.pad(products, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    out = None
    for t, (i, j) in enumerate(taps):
        # output (y, x) reads input (y + d (i - k//2), x + d (j - k//2)).
        top = pad_h + dilation * (i - k // 2)
        left = pad_w + dilation * (j - k // 2)
        term = products[:, top:top + h, left:left + w, t * cout:(t + 1) * cout]
        out = term if out is None else out + term
    return out


def batch_norm(*, train: bool, bn_mode: str, axis_name: str | None = None,
               dtype: Any = jnp.float32, name: str) -> nn.BatchNorm:
    """Batch norm that is frozen (running statistics, fixed affine) or trained.

    With ``bn_mode == 'train'`` and ``train=True`` the batch statistics are used and
    synchronised over ``axis_name`` (the pmap axis) when one is given; under `jit` on
    global (sharded) arrays they are global already. ``name`` must start with ``bn``.
    """
    config_lib.check_choice("model.bn_mode", bn_mode)
    if not name.startswith("bn"):
        raise ValueError(f"batch-norm module names must start with 'bn', got {name!r}")
    use_batch_stats = train and bn_mode == "train"
    return nn.BatchNorm(use_running_average=not use_batch_stats, momentum=0.9,
                        epsilon=BN_EPSILON, axis_name=axis_name if use_batch_stats else None,
                        dtype=dtype, name=name)


class BatchNormConstants(nn.Module):
    """The variables of a `batch_norm` layer (`nn.BatchNorm`'s names, shapes, float32
    and initial values: ``scale`` ones and ``bias`` zeros in ``params``, ``mean`` zeros
    and ``var`` ones in ``batch_stats``) as the affine map it applies with its running
    statistics: ``features -> (s, t)``, both ``[features]`` float32, with ``s = scale /
    sqrt(var + eps)`` and ``t = bias - mean * s``, so that ``BN(y) = y * s + t``.
    Gradients reach ``scale`` and ``bias`` through ``s`` and ``t``.
    """
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        shape = (features,)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
        scale = self.param("scale", nn.initializers.ones_init(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), shape, jnp.float32)
        s = scale * jax.lax.rsqrt(var.value + self.epsilon)
        return s, bias - mean.value * s


def conv_bn(x: jnp.ndarray, features: int, kernel_size: int = 3, *, train: bool,
            bn_mode: str, axis_name: str | None = None, fold: bool = True,
            conv_name: str, bn_name: str, stride: int = 1, dilation: int = 1,
            groups: int = 1, use_bias: bool = False, dtype: Any = jnp.float32,
            kernel_init=he_normal, dilated_conv: str = "native") -> jnp.ndarray:
    """``[B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), features]``: the
    convolution `conv` (submodule ``conv_name``) followed by `batch_norm` (``bn_name``),
    to be called inside a compact module.

    When the batch norm uses its running statistics in this call (``bn_mode ==
    'frozen'``, or ``train=False``) and ``fold`` is set, it is folded into the
    convolution: ``conv(x, kernel * s) + t`` (`BatchNormConstants`), one product with
    a rescaled kernel instead of a normalisation pass over the activations. Same
    function, same parameters and gradients (up to rounding); ``fold=False`` keeps the
    separate `nn.BatchNorm`.
    """
    kwargs = dict(stride=stride, dilation=dilation, groups=groups, use_bias=use_bias,
                  dtype=dtype, kernel_init=kernel_init, dilated_conv=dilated_conv)
    if fold and not (train and bn_mode == "train"):
        config_lib.check_choice("model.bn_mode", bn_mode)
        if not bn_name.startswith("bn"):
            raise ValueError(f"batch-norm module names must start with 'bn', got {bn_name!r}")
        s, t = BatchNormConstants(name=bn_name)(features)
        y = conv(features, kernel_size, scalable=True, name=conv_name, **kwargs)(x, s)
        return y + t.astype(y.dtype)
    y = conv(features, kernel_size, name=conv_name, **kwargs)(x)
    return batch_norm(train=train, bn_mode=bn_mode, axis_name=axis_name, dtype=dtype,
                      name=bn_name)(y)


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
