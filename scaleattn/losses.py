"""Segmentation losses: softmax cross-entropy with an ignore label, OHEM, extra supervision.

OHEM (online hard example mining, used by the GSAG models) follows the common
PSPNet/OCNet reading: train only on the pixels the model finds hard (true-class
probability below ``threshold``), but on at least the ``min_kept`` hardest ones of
each image. Counting ``min_kept`` per image (mmsegmentation's ``OHEMPixelSampler``
asks for ``min_kept`` x images, pooled over a device's batch) makes the kept pixels
of an image depend on that image and the model only: the same under `jit`, `pmap`
(any number of devices) and 'sharded' `jit`, and under gradient accumulation.
Everything has static shapes (a sort of each image's masked probabilities, no
boolean indexing), so it runs in every mode. ``min_kept`` counts pixels at the
resolution the loss is computed at: with ``label_resize='upsample_logits'`` (OCNet /
PSPNet-style OHEM-softmax, the GSAG configs) that is the label's, 263,169 pixels per
513x513 crop; with 'nearest' it is the logits' (65x65 = 4,225 per crop at output
stride 8), where a ``min_kept`` of 100,000 keeps every pixel and OHEM mines nothing.

Normalisation: a loss is the sum over valid pixels divided by the number of valid
pixels in the *global* batch. The count is summed over the replicas of the step
(`parallel.Replicas`: the devices of a pmap, a no-op otherwise), so that summing the
per-device gradients gives exactly the single-device gradient, whatever the number
of ignored pixels on each device.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from scaleattn import config as config_lib
from scaleattn import parallel
from scaleattn.models import layers


def match_sizes(logits: jnp.ndarray, labels: jnp.ndarray, label_resize: str):
    """Brings ``logits [B,h,w,C]`` and ``labels [B,H,W]`` to one size.

    'nearest' shrinks the labels to the logits' size (the paper, Caffe's DeepLab);
    'upsample_logits' grows the logits to the labels' size (bilinear).
    """
    if label_resize == "nearest":
        return logits, layers.resize_nearest(labels, logits.shape[1:3])
    config_lib.check_choice("loss.label_resize", label_resize)
    return layers.resize_bilinear(logits, labels.shape[1:3]), labels


def global_count(mask: jnp.ndarray,
                 replicas: parallel.Replicas = parallel.SINGLE) -> jnp.ndarray:
    """Number of true entries of ``mask`` over the whole (possibly pmapped) batch, >= 1."""
    return jnp.maximum(replicas.sum(jnp.sum(mask, dtype=jnp.float32)), 1.0)


def pixel_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                        ignore_label: int = 255) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-pixel CE ``[B,h,w]`` (0 where ignored) and the valid mask, same size inputs."""
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid


def ohem_keep_mask(true_prob: jnp.ndarray, valid: jnp.ndarray, *, threshold: float,
                   min_kept: int) -> jnp.ndarray:
    """Which pixels of one pool OHEM trains on: bool, the shape of ``true_prob`` (any
    shape; the loss calls it on each image, `trained_pixels`).

    A valid pixel is kept when ``p < threshold`` or ``p <= p_k``, where ``p_k`` is the
    ``min_kept``-th smallest true-class probability among the valid pixels (1-based).
    So: every hard pixel (``p < threshold``) if there are at least ``min_kept`` of them;
    otherwise the ``min_kept`` hardest valid pixels (the threshold is raised to ``p_k``);
    all valid pixels if there are at most ``min_kept``.

    Ties: every pixel whose probability equals ``p_k`` is kept, so more than
    ``min_kept`` pixels can be kept when several share the ``min_kept``-th value. The
    ``threshold`` comparison is strict (``p == threshold`` is not hard by itself).
    """
    valid = valid.astype(bool)
    p = true_prob.reshape(-1).astype(jnp.float32)
    keep = valid.reshape(-1) & (p < threshold)
    k = min(int(min_kept), p.size)
    if k > 0:
        # Invalid pixels sort last (inf): with fewer than k valid pixels p_k is inf and
        # every valid pixel is kept.
        p_k = jnp.sort(jnp.where(valid.reshape(-1), p, jnp.inf))[k - 1]
        keep = keep | (valid.reshape(-1) & (p <= p_k))
    return keep.reshape(true_prob.shape)


def trained_pixels(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int = 255,
                   label_resize: str = "nearest",
                   ohem: tuple[float, int] | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-pixel CE and the mask of the pixels trained on, at the loss's resolution.

    ``logits [B, h, w, C]`` and ``labels [B, H, W]`` are matched as ``label_resize``
    says (`match_sizes`); returns ``(nll, mask)``, both ``[B, h', w']`` (the matched
    size), ``nll`` 0 outside ``mask``. ``mask``: the non-ignored pixels, and with
    ``ohem = (threshold, min_kept)`` only the hard ones, ``min_kept`` counted per image
    (`ohem_keep_mask` image by image; the selection is not differentiated through).
    """
    logits, labels = match_sizes(logits, labels, label_resize)
    nll, mask = pixel_cross_entropy(logits, labels, ignore_label)
    if ohem is not None:
        threshold, min_kept = ohem
        per_image = functools.partial(ohem_keep_mask, threshold=threshold, min_kept=min_kept)
        mask = jax.vmap(per_image)(jax.lax.stop_gradient(jnp.exp(-nll)), mask)
        nll = jnp.where(mask, nll, 0.0)
    return nll, mask


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, *, ignore_label: int = 255,
                  label_resize: str = "nearest", ohem: tuple[float, int] | None = None,
                  replicas: parallel.Replicas = parallel.SINGLE) -> jnp.ndarray:
    """Mean softmax cross-entropy over non-ignored (and, with OHEM, hard) pixels.

    Args:
      logits: ``[B, h, w, C]`` class scores.
      labels: ``[B, H, W]`` int class ids, ``ignore_label`` where unlabelled.
      label_resize: how sizes are matched, see `match_sizes`.
      ohem: ``(threshold, min_kept)`` to train on hard pixels only (``min_kept`` per
        image), ``None`` for all pixels (see `trained_pixels`).
      replicas: the replicas to count the pixels over (see module docstring).

    Returns:
      Scalar loss (0, with zero gradients, when no pixel counts).
    """
    nll, mask = trained_pixels(logits, labels, ignore_label=ignore_label,
                               label_resize=label_resize, ohem=ohem)
    return jnp.sum(nll) / global_count(mask, replicas)


def ohem_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, *, threshold: float = 0.7,
                       min_kept: int = 100_000, ignore_label: int = 255,
                       replicas: parallel.Replicas = parallel.SINGLE) -> jnp.ndarray:
    """`cross_entropy` with OHEM, for logits and labels of one size ``[B, h, w]``."""
    return cross_entropy(logits, labels, ignore_label=ignore_label, ohem=(threshold, min_kept),
                         replicas=replicas)


def supervised_maps(outputs: dict, cfg: ml_collections.ConfigDict) -> dict:
    """The score maps the loss terms are computed on, by term name.

    ``loss_merged`` is the merged map; with ``cfg.extra_supervision`` and more than one
    scale, ``loss_scale_<i>`` is scale ``i``'s map: at the branch's own output size
    (``cfg.scale_loss_size == 'branch'``, the paper: the ground truth is shrunk to each
    branch's size) or after its resize to the merged size ('merged').
    """
    config_lib.check_choice("loss.scale_loss_size", cfg.scale_loss_size)
    maps = {"loss_merged": outputs["logits"]}
    key = {"branch": "branch_logits", "merged": "scale_logits"}[cfg.scale_loss_size]
    per_scale = outputs.get(key, [])
    if cfg.extra_supervision and len(per_scale) > 1:
        maps.update({f"loss_scale_{i}": logits for i, logits in enumerate(per_scale)})
    return maps


def segmentation_loss(outputs: dict, labels: jnp.ndarray, cfg: ml_collections.ConfigDict,
                      replicas: parallel.Replicas = parallel.SINGLE) -> tuple[jnp.ndarray, dict]:
    """The training objective of a model's outputs: ``CE(merged) + sum_s CE(f^s)``.

    One cross-entropy term (plain or OHEM, ``cfg.type``) per map of `supervised_maps`:
    the merged map, plus (the paper's extra supervision) one per scale. Labels are
    matched to each map's size as ``cfg.label_resize`` says.

    Returns:
      ``(loss, terms)`` with ``terms = {'loss_merged': ..., 'loss_scale_<i>': ...}``.
    """
    ohem = (cfg.ohem_threshold, cfg.ohem_min_kept) if cfg.type == "ohem" else None
    terms = {name: cross_entropy(logits, labels, ignore_label=cfg.ignore_label,
                                 label_resize=cfg.label_resize, ohem=ohem, replicas=replicas)
             for name, logits in supervised_maps(outputs, cfg).items()}
    return sum(terms.values()), terms
