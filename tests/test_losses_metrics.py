"""Cross-entropy with an ignore label, extra supervision, and confusion-matrix metrics."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scaleattn import losses, metrics


def numpy_cross_entropy(logits, labels, ignore=255):
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for idx in np.ndindex(labels.shape):
        if labels[idx] != ignore:
            total -= log_probs[idx][labels[idx]]
            count += 1
    return total / max(count, 1)


def random_case(seed, shape=(2, 6, 5), classes=4):
    rng = np.random.RandomState(seed)
    logits = rng.randn(*shape, classes).astype(np.float32) * 3
    labels = rng.randint(0, classes, shape).astype(np.int32)
    labels[rng.rand(*shape) < 0.3] = 255
    return logits, labels


def test_cross_entropy_ignores_255():
    logits, labels = random_case(0)
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, numpy_cross_entropy(logits, labels), rtol=1e-5)
    # changing the scores of ignored pixels changes nothing
    logits2 = logits.copy()
    logits2[labels == 255] += 100.0
    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits2), jnp.asarray(labels)),
                               got, rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero():
    logits, labels = random_case(1)
    labels[:] = 255
    assert float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == 0.0


def test_labels_resized_nearest_to_logits():
    rng = np.random.RandomState(2)
    logits = rng.randn(1, 3, 3, 4).astype(np.float32)
    labels = rng.randint(0, 4, (1, 9, 9)).astype(np.int32)
    labels[0, 4, 0] = 255
    expected = numpy_cross_entropy(logits, labels[:, ::4, ::4])  # (9-1)/(3-1) = 4
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_resize="nearest")
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_logits_upsampled_to_labels():
    rng = np.random.RandomState(3)
    logits = rng.randn(1, 2, 2, 3).astype(np.float32)
    labels = rng.randint(0, 3, (1, 3, 3)).astype(np.int32)
    # align-corners bilinear 2 -> 3: the middle row/column is the mean of its neighbours
    up = np.zeros((1, 3, 3, 3), np.float32)
    for i, y in enumerate([0, 0.5, 1]):
        for j, x in enumerate([0, 0.5, 1]):
            up[0, i, j] = ((1 - y) * (1 - x) * logits[0, 0, 0] + (1 - y) * x * logits[0, 0, 1]
                           + y * (1 - x) * logits[0, 1, 0] + y * x * logits[0, 1, 1])
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                               label_resize="upsample_logits")
    np.testing.assert_allclose(got, numpy_cross_entropy(up, labels), rtol=1e-5)


def numpy_nearest_downsample(labels, size):
    """Label ``[B, H, W]`` -> ``[B, h, w]``: output pixel i takes input row
    round(i (H - 1) / (h - 1)) (the centre of its cell for a stride-8 net on 321 -> 41)."""
    rows = [int(np.floor(i * (labels.shape[1] - 1) / (size[0] - 1) + 0.5)) for i in range(size[0])]
    cols = [int(np.floor(j * (labels.shape[2] - 1) / (size[1] - 1) + 0.5)) for j in range(size[1])]
    return labels[:, rows][:, :, cols]


def numpy_bilinear(x, size):
    """Align-corners bilinear resize of ``[B, h, w, C]`` by explicit interpolation."""
    b, h, w, c = x.shape
    out = np.zeros((b, size[0], size[1], c), np.float64)
    for i in range(size[0]):
        y = i * (h - 1) / (size[0] - 1)
        y0, fy = min(int(y), h - 2), y - min(int(y), h - 2)
        for j in range(size[1]):
            xx = j * (w - 1) / (size[1] - 1)
            x0, fx = min(int(xx), w - 2), xx - min(int(xx), w - 2)
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x0 + 1]
                            + fy * (1 - fx) * x[:, y0 + 1, x0] + fy * fx * x[:, y0 + 1, x0 + 1])
    return out


@pytest.mark.parametrize("extra,size", [(True, "branch"), (True, "merged"), (False, "branch")])
def test_extra_supervision_adds_one_term_per_scale(extra, size):
    """The paper's shapes: a 321 crop gives branch maps of 41, 31 and 21 (scales 1, 0.75,
    0.5). Loss = CE(merged at 41) + sum_s CE(f^s): 'branch' against the labels shrunk
    (nearest) to each branch's own size, 'merged' on the maps resized to 41."""
    rng = np.random.RandomState(3)
    labels = rng.randint(0, 4, (2, 321, 321)).astype(np.int32)
    labels[rng.rand(2, 321, 321) < 0.2] = 255
    branch = [rng.randn(2, n, n, 4).astype(np.float32) * 2 for n in (41, 31, 21)]
    resized = [numpy_bilinear(m, (41, 41)).astype(np.float32) for m in branch]
    merged = sum(resized) / 3
    cfg = ml_collections.ConfigDict(dict(extra_supervision=extra, label_resize="nearest",
                                         type="ce", ignore_label=255, scale_loss_size=size))
    outputs = {"logits": jnp.asarray(merged), "scale_logits": [jnp.asarray(m) for m in resized],
               "branch_logits": [jnp.asarray(m) for m in branch]}
    loss, terms = losses.segmentation_loss(outputs, jnp.asarray(labels), cfg)
    at = lambda m: numpy_cross_entropy(m, numpy_nearest_downsample(labels, m.shape[1:3]))  # noqa
    expected = {"loss_merged": at(merged)}
    if extra:
        maps = branch if size == "branch" else resized
        expected.update({f"loss_scale_{i}": at(m) for i, m in enumerate(maps)})
    assert sorted(terms) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, sum(expected.values()), rtol=1e-5)
    if extra and size == "branch":  # the paper's terms differ from the resized maps' ones
        assert abs(terms["loss_scale_2"] - at(resized[2])) > 1e-3


def numpy_confusion(pred, label, classes):
    confusion = np.zeros((classes, classes), np.int64)
    for p, t in zip(pred.ravel(), label.ravel()):
        if t != 255:
            confusion[t, p] += 1
    return confusion


def test_confusion_matrix_matches_numpy():
    rng = np.random.RandomState(8)
    label = rng.randint(0, 5, (3, 7, 9))
    label[rng.rand(3, 7, 9) < 0.2] = 255
    pred = rng.randint(0, 5, (3, 7, 9))
    got = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 5)
    np.testing.assert_array_equal(got, numpy_confusion(pred, label, 5))


def test_scores_hand_computed_with_absent_class():
    # 4 classes; class 3 appears nowhere (neither label nor prediction) -> NaN, not averaged.
    label = np.array([0, 0, 0, 1, 1, 2, 2, 2, 255])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 3])
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 4))
    s = metrics.scores(cm)
    # class 0: tp 2, fp 1 (a 2 predicted 0), fn 1 -> 2/4; class 1: tp 2, fp 1 -> 2/3;
    # class 2: tp 2, fn 1 -> 2/3; class 3: the ignored pixel does not count -> absent.
    np.testing.assert_allclose(s["per_class_iou"][:3], [0.5, 2 / 3, 2 / 3])
    assert np.isnan(s["per_class_iou"][3])
    np.testing.assert_allclose(s["miou"], (0.5 + 2 / 3 + 2 / 3) / 3)
    np.testing.assert_allclose(s["pixel_accuracy"], 6 / 8)


def test_class_only_predicted_counts_with_zero_iou():
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    s = metrics.scores(np.asarray(metrics.confusion_matrix(jnp.asarray(pred),
                                                           jnp.asarray(label), 3)))
    np.testing.assert_allclose(s["per_class_iou"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(s["miou"], 0.5)
