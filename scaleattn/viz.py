"""Pictures of predictions: palette masks, overlays, attention heat maps.

Everything here is a pure numpy function from arrays to ``uint8 [h, w, 3]`` pictures
(or a palette `PIL.Image`); the training loop sends `panel` pictures to TensorBoard
(`scaleattn.summaries`) and ``--mode=predict`` writes the others to files.

* Class colours are VOC's palette (class id ``c`` gets the bit-interleaved colour of
  ``c``; 255 = ignore is (224, 224, 192)); the demo's 4 classes use its first entries.
* Attention heat maps show one scale's weight ``w^s`` in [0, 1] on a fixed colour
  scale (dark purple 0 -> yellow 1), so pictures of different images compare.
  The merged weights of up to 3 scales are one RGB picture: red = scale 0 (the first
  of ``model.scales``), green = scale 1, blue = scale 2.
"""

import numpy as np
from PIL import Image

# Anchors of the heat-map colour scale (perceptually ordered, like 'inferno').
_HEAT_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
    [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float64)


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """``uint8 [num_colors, 3]``: VOC's palette (the bits of the id spread over R, G, B)."""
    palette = np.zeros((num_colors, 3), np.uint8)
    for index in range(num_colors):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


PALETTE = voc_palette()


def mask_image(mask: np.ndarray) -> Image.Image:
    """``[h, w]`` class ids (0..255) -> palette ('P') PNG image; the index is the class."""
    image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    return image


def colorize(mask: np.ndarray) -> np.ndarray:
    """``[h, w]`` class ids -> ``uint8 [h, w, 3]`` palette colours."""
    return PALETTE[np.asarray(mask, np.int64) % 256]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, *,
            ignore_label: int = 255) -> np.ndarray:
    """Class colours blended into ``image`` (``uint8 [h, w, 3]``) where ``mask [h, w]``
    is an object (not background 0, not ``ignore_label``); ``uint8 [h, w, 3]`` out."""
    image = np.asarray(image, np.float32)
    objects = ((mask != 0) & (mask != ignore_label))[..., None]
    blended = (1 - alpha) * image + alpha * colorize(mask).astype(np.float32)
    return np.where(objects, blended, image).round().astype(np.uint8)


def heatmap(weights: np.ndarray) -> np.ndarray:
    """``[h, w]`` values in [0, 1] -> ``uint8 [h, w, 3]`` on the fixed colour scale."""
    t = np.clip(np.asarray(weights, np.float64), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(t).astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (t - low)[..., None]
    colour = (1 - frac) * _HEAT_ANCHORS[low] + frac * _HEAT_ANCHORS[low + 1]
    return colour.round().astype(np.uint8)


def attention_rgb(attention: np.ndarray) -> np.ndarray:
    """``[h, w, S]`` weights (S <= 3) -> ``uint8 [h, w, 3]``: scale s in channel s."""
    attention = np.asarray(attention, np.float64)
    if attention.shape[-1] > 3:
        raise ValueError(f"an RGB composite shows at most 3 scales, got "
                         f"{attention.shape[-1]}")
    rgb = np.zeros(attention.shape[:2] + (3,))
    rgb[..., :attention.shape[-1]] = np.clip(attention, 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
    """Normalised ``float [h, w, 3]`` (as the pipeline makes it) -> ``uint8`` RGB."""
    pixels = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(
        mean, np.float32)
    return np.clip(pixels.round(), 0, 255).astype(np.uint8)


def panel(image: np.ndarray, prediction: np.ndarray, *, label: np.ndarray | None = None,
          attention: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """One row of pictures side by side, ``uint8 [h, k * w, 3]``:
    image | label (if given) | prediction overlay | one heat map per scale | RGB composite
    (when there are 2 or 3 scales). Inputs are ``[h, w, ...]`` at one size."""
    parts = [np.asarray(image, np.uint8)]
    if label is not None:
        parts.append(colorize(label))
    parts.append(overlay(image, prediction, alpha))
    if attention is not None:
        parts += [heatmap(attention[..., s]) for s in range(attention.shape[-1])]
        if attention.shape[-1] <= 3:
            parts.append(attention_rgb(attention))
    return np.concatenate(parts, axis=1)
