"""The evaluation input, one definition for the eval pipeline and for image files.

An image is normalised with ``data.mean`` / ``data.std`` and placed at the top-left
of a padded array whose padding is the mean pixel (0 after normalisation); its label
is padded with the ignore label. The eval pipeline pads to ``data.eval_size`` square
(`scaleattn.data.pipeline.eval_batches`, through ``tf.numpy_function``);
``--mode=predict`` pads an image file to `padded_size`. Numpy only: no TensorFlow.
"""

import numpy as np


def padded_size(height: int, width: int, eval_size: int, multiple: int = 8) -> tuple:
    """The size an image file is padded to: ``eval_size`` (as in eval), or more for a
    larger image, rounded up to ``multiple`` so that few sizes are compiled."""
    def grow(n):
        return max(eval_size, -(-n // multiple) * multiple)
    return grow(height), grow(width)


def eval_image(image: np.ndarray, size: tuple[int, int], mean, std) -> np.ndarray:
    """``uint8 [h, w, 3]`` -> ``float32 [H, W, 3]`` (``size``, at least ``h x w``):
    ``(image - mean) / std`` at the top-left, 0 (the mean pixel) elsewhere."""
    h, w = image.shape[:2]
    out = np.zeros(tuple(size) + (3,), np.float32)
    out[:h, :w] = ((image.astype(np.float32) - np.asarray(mean, np.float32))
                   / np.asarray(std, np.float32))
    return out


def eval_label(label: np.ndarray, size: tuple[int, int], ignore_label: int) -> np.ndarray:
    """``[h, w]`` class ids -> ``int32 [H, W]``: the label at the top-left,
    ``ignore_label`` elsewhere."""
    h, w = label.shape[:2]
    out = np.full(tuple(size), ignore_label, np.int32)
    out[:h, :w] = label
    return out
