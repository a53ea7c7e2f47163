"""Segmentation metrics from a confusion matrix accumulated on device.

`confusion_matrix` runs inside the jitted eval step; the host sums the ``[C, C]``
matrices over batches (and devices) and `scores` turns the total into mIoU, pixel
accuracy and per-class IoU.
"""

import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions: jnp.ndarray, labels: jnp.ndarray, num_classes: int,
                     ignore_label: int = 255) -> jnp.ndarray:
    """``[C, C]`` int32 counts, rows = true class, columns = predicted class.

    Args:
      predictions: ``[...]`` int predicted class ids.
      labels: ``[...]`` int true class ids; ``ignore_label`` (and any id outside
        ``[0, C)``) is not counted.
    """
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def scores(confusion: np.ndarray) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a ``[C, C]`` confusion matrix.

    A class that appears neither in the labels nor in the predictions has no IoU
    (NaN in ``per_class_iou``) and is left out of the mean, as in the VOC devkit.
    """
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "per_class_iou": iou,
    }
