"""OHEM cross-entropy: which pixels are kept, and the loss over them, against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn.losses import ohem_cross_entropy, ohem_keep_mask


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


def np_ohem_loss(logits, labels, threshold, min_kept, ignore_label=255):
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    valid = labels != ignore_label
    nll = -np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    keep = np_keep_mask(np.exp(-nll), valid, threshold, min_kept)
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
