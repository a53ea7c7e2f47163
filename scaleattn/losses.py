"""Segmentation losses: softmax cross-entropy with an ignore label, extra supervision.

Normalisation: a loss is the sum over valid pixels divided by the number of valid
pixels in the *global* batch. Under `pmap` the count is `psum`-ed over ``axis_name``
so that summing the per-device gradients gives exactly the single-device gradient,
whatever the number of ignored pixels on each device.
"""

import jax
import jax.numpy as jnp
import ml_collections

from scaleattn.models import layers

LABEL_RESIZES = ("nearest", "upsample_logits")


def match_sizes(logits: jnp.ndarray, labels: jnp.ndarray, label_resize: str):
    """Brings ``logits [B,h,w,C]`` and ``labels [B,H,W]`` to one size.

    'nearest' shrinks the labels to the logits' size (the paper, Caffe's DeepLab);
    'upsample_logits' grows the logits to the labels' size (bilinear).
    """
    if label_resize == "nearest":
        return logits, layers.resize_nearest(labels, logits.shape[1:3])
    if label_resize == "upsample_logits":
        return layers.resize_bilinear(logits, labels.shape[1:3]), labels
    raise ValueError(f"loss.label_resize must be one of {LABEL_RESIZES}, got {label_resize!r}")


def global_count(mask: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
    """Number of true entries of ``mask`` over the whole (possibly pmapped) batch, >= 1."""
    count = jnp.sum(mask, dtype=jnp.float32)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    return jnp.maximum(count, 1.0)


def pixel_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                        ignore_label: int = 255) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-pixel CE ``[B,h,w]`` (0 where ignored) and the valid mask, same size inputs."""
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int = 255,
                  label_resize: str = "nearest", axis_name: str | None = None) -> jnp.ndarray:
    """Mean softmax cross-entropy over non-ignored pixels.

    Args:
      logits: ``[B, h, w, C]`` class scores.
      labels: ``[B, H, W]`` int class ids, ``ignore_label`` where unlabelled.
      label_resize: how sizes are matched, see `match_sizes`.
      axis_name: pmap axis to count valid pixels over (see module docstring).

    Returns:
      Scalar loss (0 when every pixel is ignored).
    """
    logits, labels = match_sizes(logits, labels, label_resize)
    nll, valid = pixel_cross_entropy(logits, labels, ignore_label)
    return jnp.sum(nll) / global_count(valid, axis_name)


def segmentation_loss(outputs: dict, labels: jnp.ndarray, cfg: ml_collections.ConfigDict,
                      axis_name: str | None = None) -> tuple[jnp.ndarray, dict]:
    """The training objective of a model's outputs.

    ``CE(merged)`` plus, with ``cfg.extra_supervision`` and more than one scale,
    ``sum_s CE(scale_logits[s])`` (the paper's extra supervision).

    Returns:
      ``(loss, terms)`` with ``terms = {'loss_merged': ..., 'loss_scale_<i>': ...}``.
    """
    def term(logits):
        return cross_entropy(logits, labels, ignore_label=cfg.ignore_label,
                             label_resize=cfg.label_resize, axis_name=axis_name)

    terms = {"loss_merged": term(outputs["logits"])}
    scale_logits = outputs.get("scale_logits", [])
    if cfg.extra_supervision and len(scale_logits) > 1:
        for i, logits in enumerate(scale_logits):
            terms[f"loss_scale_{i}"] = term(logits)
    return sum(terms.values()), terms
