"""Array surgery: source layouts -> ours, VGG16's classifier -> LargeFOV, input folding.

* **Layouts.** torch conv kernels ``[O, I, kh, kw]`` -> HWIO ``[kh, kw, I, O]``
  (`conv_kernel_from_torch`); Keras kernels are HWIO already. A fully connected layer
  reading a flattened ``size x size`` map is the ``size x size`` conv with the same
  weights (`fc_as_conv_from_torch`: torch flattens ``(C, H, W)``;
  `fc_as_conv_from_keras`: Keras flattens ``(H, W, C)``).
* **VGG16's fully connected layers -> LargeFOV** (DeepLab's surgery). fc6
  (``[4096, 512*7*7]``) is the 7x7 conv it is on pool5; DeepLab keeps every 4th output
  filter (4096 -> 1024) and the taps 0, 3, 6 of each spatial axis (7x7 -> 3x3). On
  VGG's stride-32 pool5 the taps are 32 pixels apart; on LargeFOV's stride-8 map that
  is 4 cells, and every 3rd tap is 12: the 3x3 conv with dilation 12 (`largefov_fc6`).
  fc7 keeps every 4th input and output (4096x4096 -> 1024x1024, `largefov_fc7`).
* **Input normalisation.** Our pipeline feeds RGB ``(x - data.mean) / data.std`` on
  0..255 pixels. torchvision models expect exactly that with ImageNet's mean/std (the
  config's defaults). Keras' VGG16/ResNet use 'caffe' preprocessing: BGR, minus
  (103.939, 116.779, 123.68), no std. Any difference is folded into the first conv
  (`fold_input_convention`): its input channels are reordered and scaled by the std
  ratio, and the mean difference becomes a bias (conv1_1's bias, or for a ResNet a
  shift of bn1's mean; `first_conv` says which). The result is exact except at the
  image border, where the source pads with *its* mean and we with ours: for Keras
  sources and the default ImageNet mean that is a shift of at most 0.5 grey levels in
  the padding (~2e-4 relative on VGG16's conv5 features of a 64x64 image, less on
  larger ones). ``--mean`` equal to the source's mean (and the same
  ``config.data.mean``) makes the copy exact up to float rounding.
"""

import dataclasses
from typing import Sequence

import numpy as np

from scaleattn.config import IMAGENET_MEAN, IMAGENET_STD
from scaleattn.pretrained.maps import Path



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
FC_SIZES = {"fc6": VGG_FC_SIZE, "fc7": 1}   # the map each fc layer reads: 7x7 and 1x1


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


LARGEFOV_SURGERY = {"fc6": largefov_fc6, "fc7": largefov_fc7}


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


def first_conv(arch: str) -> tuple[Path, Path, float]:
    """``(kernel path, path that absorbs the input shift, sign)`` of the stem conv:
    the folded first conv's ``shift [O]`` is added to that path's array times sign
    (conv1_1's bias for VGG16; minus bn1's mean for a ResNet, whose convs have no bias)."""
    if arch == "vgg16":
        return (("params", "backbone", "conv1_1", "kernel"),
                ("params", "backbone", "conv1_1", "bias"), 1.0)
    return (("params", "backbone", "conv1", "kernel"),
            ("batch_stats", "backbone", "bn1", "mean"), -1.0)

