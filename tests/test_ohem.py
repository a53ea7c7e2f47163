"""OHEM cross-entropy: which pixels are kept, and the loss over them, against numpy."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn import losses
from scaleattn.losses import ohem_cross_entropy, ohem_keep_mask
from scaleattn.models import build_model


def np_keep_mask(prob, valid, threshold, min_kept):
    """PSPNet-style OHEM by sorting: raise the threshold to the min_kept-th smallest
    valid probability when fewer than min_kept valid pixels are below it."""
    p = prob[valid]
    keep = np.zeros(prob.shape, bool)
    if p.size <= min_kept:
        keep[valid] = True
        return keep
    kth = np.sort(p)[min_kept - 1] if min_kept > 0 else -np.inf
    keep[valid] = (p <= kth) if kth >= threshold else (p < threshold)
    return keep


def np_keep_mask_per_image(prob, valid, threshold, min_kept):
    """`np_keep_mask` on each image ``prob[i]`` of a batch on its own."""
    return np.stack([np_keep_mask(p, v, threshold, min_kept) for p, v in zip(prob, valid)])


def np_ohem_loss(logits, labels, threshold, min_kept, ignore_label=255):
    """OHEM loss of a batch ``[B, h, w, C]``, ``min_kept`` per image; (loss, kept count)."""
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    valid = labels != ignore_label
    nll = -np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    keep = np_keep_mask_per_image(np.exp(-nll), valid, threshold, min_kept)
    return nll[keep].sum() / max(keep.sum(), 1), keep.sum()


def keep_mask(prob, valid, threshold, min_kept):
    fn = jax.jit(functools.partial(ohem_keep_mask, threshold=threshold, min_kept=min_kept))
    return np.asarray(fn(prob, valid))


@pytest.fixture
def probs():
    rng = np.random.default_rng(0)
    prob = rng.uniform(size=(2, 8, 9)).astype(np.float32)
    valid = rng.uniform(size=prob.shape) > 0.2
    return prob, valid


def test_threshold_case_keeps_every_hard_pixel(probs):
    prob, valid = probs
    hard = valid & (prob < 0.7)
    assert hard.sum() > 20
    keep = keep_mask(prob, valid, 0.7, 20)
    np.testing.assert_array_equal(keep, hard)
    np.testing.assert_array_equal(keep, np_keep_mask(prob, valid, 0.7, 20))


@pytest.mark.parametrize("threshold, min_kept", [(0.0, 1), (0.1, 30), (0.1, 100)])
def test_min_kept_case_keeps_the_hardest(probs, threshold, min_kept):
    prob, valid = probs
    assert (valid & (prob < threshold)).sum() < min_kept < valid.sum()
    keep = keep_mask(prob, valid, threshold, min_kept)
    assert keep.sum() == min_kept          # no ties among random probabilities
    assert not np.any(keep & ~valid)
    assert prob[keep].max() < prob[valid & ~keep].min()
    np.testing.assert_array_equal(keep, np_keep_mask(prob, valid, threshold, min_kept))


def test_fewer_valid_than_min_kept_keeps_all_valid(probs):
    prob, valid = probs
    for min_kept in (int(valid.sum()), int(valid.sum()) + 1, prob.size, 10 * prob.size):
        np.testing.assert_array_equal(keep_mask(prob, valid, 0.1, min_kept), valid)


def test_min_kept_zero_is_the_threshold_alone(probs):
    prob, valid = probs
    np.testing.assert_array_equal(keep_mask(prob, valid, 0.3, 0), valid & (prob < 0.3))


def test_ties():
    prob = np.array([0.9, 0.8, 0.8, 0.95, 0.8, 0.7, 0.7, 0.99], np.float32)
    valid = np.array([True, True, True, True, False, True, True, True])
    # Valid probabilities sorted: 0.7, 0.7, 0.8, 0.8, 0.9, ... With min_kept = 3 the
    # 3rd smallest is 0.8, shared by two valid pixels: both are kept, 4 pixels in all.
    keep = keep_mask(prob, valid, 0.7, 3)
    np.testing.assert_array_equal(keep, [False, True, True, False, False, True, True, False])
    np.testing.assert_array_equal(keep, np_keep_mask(prob, valid, 0.7, 3))
    # p == threshold is not hard on its own (strict comparison) ...
    np.testing.assert_array_equal(keep_mask(prob, valid, 0.7, 0), np.zeros(8, bool))
    # ... but is kept through min_kept, together with its tie.
    np.testing.assert_array_equal(keep_mask(prob, valid, 0.7, 1), prob == np.float32(0.7))


@pytest.mark.parametrize("threshold, min_kept", [(0.7, 10), (0.2, 40), (0.7, 0), (0.5, 500)])
def test_loss_matches_numpy(threshold, min_kept):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(2, 6, 7, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 6, 7))
    labels[rng.uniform(size=labels.shape) < 0.2] = 255
    loss = jax.jit(functools.partial(ohem_cross_entropy, threshold=threshold,
                                     min_kept=min_kept))(logits, labels)
    expected, kept = np_ohem_loss(logits, labels, threshold, min_kept)
    assert kept > 0
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_min_kept_counts_each_image_whatever_the_batch_around_it():
    """An image's kept pixels are the same alone, in a batch, or in any split of it: at
    least min_kept of its own (the hardest), however easy the others are."""
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(4, 6, 7, 3)).astype(np.float32)
    logits[:2] *= 4.0  # two confident images, two unsure ones
    labels = rng.integers(0, 3, size=(4, 6, 7))
    labels[rng.uniform(size=labels.shape) < 0.2] = 255
    mask_of = jax.jit(lambda x, y: losses.trained_pixels(x, y, ohem=(0.2, 9))[1])
    whole = np.asarray(mask_of(logits, labels))
    for image in range(4):
        np.testing.assert_array_equal(whole[image], mask_of(logits[image:image + 1],
                                                            labels[image:image + 1])[0])
        assert whole[image].sum() >= 9
    np.testing.assert_array_equal(whole[2:], mask_of(logits[2:], labels[2:]))
    nll = -jax.nn.log_softmax(logits)
    prob = np.exp(-np.take_along_axis(np.asarray(nll), np.where(labels == 255, 0, labels)[
        ..., None], -1)[..., 0])
    np.testing.assert_array_equal(whole, np_keep_mask_per_image(prob, labels != 255, 0.2, 9))


def test_all_ignored_batch_gives_zero_loss_and_gradient():
    logits = jnp.ones((2, 3, 3, 5))
    labels = jnp.full((2, 3, 3), 255)
    loss_fn = jax.jit(jax.value_and_grad(functools.partial(ohem_cross_entropy, min_kept=4)))
    loss, grad = loss_fn(logits, labels)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_gradient_flows_only_through_kept_pixels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(1, 4, 4))
    loss_fn = functools.partial(ohem_cross_entropy, threshold=0.0, min_kept=5)
    grad = jax.grad(loss_fn)(logits, labels)
    _, kept = np_ohem_loss(logits, labels, 0.0, 5)
    assert kept == 5
    assert (np.abs(grad).sum(-1) > 0).sum() == 5


# ---- the shipped GSAG configs mine ------------------------------------------------

# Every head, alone and inside Attention to Scale, on ResNet-101; the other backbones
# (the same output shapes) with the hybrid head.
GSAG_CONFIGS = [spec.split("/", 1)[1].replace(".py", "") for spec in config_lib.shipped()
                if spec.startswith("configs/gsag.py") and "r50" not in spec
                and "x101" not in spec] + ["gsag:r50", "gsag:x101"]


def model_output_shapes(cfg, batch: int) -> dict:
    """Shapes of the maps each loss term of ``cfg`` is computed on, by term name.

    The model's real code under `jax.eval_shape` on a ``[batch, crop, crop, 3]`` input,
    at 1/64 width and one block per stage: output sizes follow from the strides and
    scales alone, not from widths or depths, and nothing is computed.
    """
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
    model_cfg.width, model_cfg.depth = 1 / 64, (1, 1, 1, 1)
    model = build_model(model_cfg)
    images = jax.ShapeDtypeStruct((batch, cfg.data.crop_size, cfg.data.crop_size, 3),
                                  jnp.float32)
    outputs = jax.eval_shape(lambda x: model.init_with_output(
        jax.random.key(0), x, train=False)[0], images)
    return {name: m.shape for name, m in losses.supervised_maps(outputs, cfg.loss).items()}


def partly_trained_logits(shape, labels_per_image, confident_columns, seed=0):
    """Logits ``[b, h, w, C]`` that depend on the column only: near-uniform softmax
    (initialisation-like, N(0, 0.01) scores) everywhere, plus a margin of 6 on each
    image's class in the first ``confident_columns`` columns (p_true ~ 0.95 there)."""
    b, h, w, c = shape
    columns = np.random.default_rng(seed).normal(0, 0.01, size=(b, 1, w, c))
    columns[np.arange(b), 0, :confident_columns, labels_per_image] += 6.0
    return np.broadcast_to(columns, shape).astype(np.float32)


def np_upsampled_true_prob(logits, labels_per_image, size):
    """True-class probability ``[b, size]`` along the columns of column-only ``logits``
    grown to ``size`` columns (align_corners, 1-D `np.interp`)."""
    b, _, w, c = logits.shape
    x = np.arange(size) * (w - 1) / (size - 1)
    up = np.stack([np.stack([np.interp(x, np.arange(w), logits[i, 0, :, k]) for k in range(c)],
                            -1) for i in range(b)]).astype(np.float64)       # [b, size, C]
    probs = np.exp(up - up.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs[np.arange(b), :, labels_per_image]


@functools.lru_cache(maxsize=None)
def kept_and_valid(logit_shape, crop, ignore_label, label_resize, threshold, min_kept):
    """``(kept, valid, expected)`` for one loss term on the partly trained logits: OHEM's
    kept-pixel count and the valid-pixel count at the loss's resolution, and (with
    'upsample_logits') numpy's kept count. Cached: many configs share their shapes."""
    b, h, w, c = logit_shape
    rng = np.random.default_rng(1)
    labels_per_image = rng.integers(0, c, size=b)
    labels = np.broadcast_to(labels_per_image[:, None, None], (b, crop, crop)).copy()
    labels[rng.uniform(size=labels.shape) < 0.05] = ignore_label      # VOC-like void band
    logits = partly_trained_logits(logit_shape, labels_per_image, int(0.7 * w))

    def mask(ohem):
        return np.asarray(jax.jit(functools.partial(
            losses.trained_pixels, ignore_label=ignore_label, label_resize=label_resize,
            ohem=ohem))(logits, labels)[1])

    matched = losses.match_sizes(np.zeros(logit_shape[:3] + (1,), np.float32), labels,
                                 label_resize)[1]
    kept, valid = mask((threshold, min_kept)).sum(), np.sum(matched != ignore_label)
    expected = None
    if label_resize == "upsample_logits":
        prob = np.broadcast_to(np_upsampled_true_prob(logits, labels_per_image, crop)[:, None],
                               labels.shape)
        expected = np_keep_mask_per_image(prob.astype(np.float32), labels != ignore_label,
                                          threshold, min_kept).sum()
    return int(kept), int(valid), expected


@pytest.mark.parametrize("name", GSAG_CONFIGS)
def test_shipped_gsag_config_ohem_mines(name):
    """Each shipped configs/gsag.py variant's OHEM (on, or one switch away) at its real
    shapes keeps clearly fewer pixels than the valid ones once the model is confident on
    some of them, at least min_kept of each image, and every pixel the model is still
    unsure of. Two images: min_kept counts each image, so the batch size does not matter."""
    cfg = config_lib.recipe(name)
    if cfg.model.gsag_variant == "hybrid":
        assert cfg.loss.type == "ohem", "the write-up's best model: hybrid + OHEM"
    images = 2
    loss = cfg.loss
    crop = cfg.data.crop_size
    for name, shape in model_output_shapes(cfg, images).items():
        assert shape[0] == images and shape[-1] == cfg.model.num_classes
        kept, valid, expected = kept_and_valid(tuple(shape), crop, loss.ignore_label,
                                               loss.label_resize, loss.ohem_threshold,
                                               loss.ohem_min_kept)
        assert valid > 0.9 * images * crop ** 2     # the label's resolution
        # numpy has one probability per column; the upsampled rows of a column can
        # differ in the last bit, so the column at an image's min_kept boundary ties
        # whole or in part: at most one column (crop pixels) per image apart.
        assert abs(kept - expected) <= images * crop, (name, kept, expected)
        assert images * min(loss.ohem_min_kept, valid // images) <= kept <= 0.5 * valid, (
            name, kept, valid)


def test_ohem_at_logit_resolution_would_keep_everything():
    """What the configs avoid: OHEM on 65x65 logits with labels shrunk to them keeps every
    valid pixel (4,225 per image < min_kept 100,000), however confident."""
    cfg = config_lib.recipe("gsag")
    kept, valid, _ = kept_and_valid((2, 65, 65, 21), 513, 255, "nearest", 0.7, 100_000)
    assert valid <= 2 * 65 * 65 and 65 * 65 < cfg.loss.ohem_min_kept
    assert kept == valid
    assert cfg.loss.label_resize == "upsample_logits"
