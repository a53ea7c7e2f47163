"""Attention to Scale: merging score maps over scales, resizing, and the wrapper."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn.models import build_model, layers, scale_attention


def numpy_softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.fixture
def scale_logits():
    return np.random.RandomState(0).randn(3, 2, 5, 4, 6).astype(np.float32)  # S,B,h,w,C


def test_attention_merge_is_weighted_sum(scale_logits):
    weights = numpy_softmax(np.random.RandomState(1).randn(2, 5, 4, 3), -1).astype(np.float32)
    expected = np.zeros(scale_logits.shape[1:], np.float32)
    for s in range(3):  # g_ic = sum_s w^s_i f^s_ic
        expected += weights[..., s:s + 1] * scale_logits[s]
    got = scale_attention.merge_scales(jnp.asarray(scale_logits), "attention",
                                       jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_avg_merge_is_attention_with_uniform_weights(scale_logits):
    avg = scale_attention.merge_scales(jnp.asarray(scale_logits), "avg")
    np.testing.assert_allclose(avg, scale_logits.mean(0), rtol=1e-5, atol=1e-6)
    uniform = np.full((2, 5, 4, 3), 1 / 3, np.float32)
    attention = scale_attention.merge_scales(jnp.asarray(scale_logits), "attention",
                                             jnp.asarray(uniform))
    np.testing.assert_allclose(avg, attention, rtol=1e-5, atol=1e-6)


def test_max_merge(scale_logits):
    got = scale_attention.merge_scales(jnp.asarray(scale_logits), "max")
    np.testing.assert_array_equal(got, scale_logits.max(0))


def test_max_merge_is_attention_with_one_hot_weights_when_one_scale_dominates():
    rng = np.random.RandomState(2)
    maps = rng.randn(3, 1, 4, 4, 5).astype(np.float32)
    winner = rng.randint(0, 3, (1, 4, 4))           # per pixel, one scale wins every class
    for s in range(3):
        maps[s] += 10.0 * (winner == s)[..., None]
    one_hot = np.eye(3, dtype=np.float32)[winner]   # [B, h, w, S]
    attention = scale_attention.merge_scales(jnp.asarray(maps), "attention",
                                             jnp.asarray(one_hot))
    np.testing.assert_allclose(scale_attention.merge_scales(jnp.asarray(maps), "max"),
                               attention, rtol=1e-6)


def test_unknown_merge_raises(scale_logits):
    with pytest.raises(ValueError, match="merge"):
        scale_attention.merge_scales(jnp.asarray(scale_logits), "median")


def numpy_bilinear_align_corners(x, out_h, out_w):
    """Independent loop reference: [B, H, W, C] -> [B, out_h, out_w, C]."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c), np.float64)
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(y)), h - 1)
        y1 = min(y0 + 1, h - 1)
        for j in range(out_w):
            xx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(xx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            dy, dx = y - y0, xx - x0
            out[:, i, j] = ((1 - dy) * (1 - dx) * x[:, y0, x0] + (1 - dy) * dx * x[:, y0, x1]
                            + dy * (1 - dx) * x[:, y1, x0] + dy * dx * x[:, y1, x1])
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((9, 7), (17, 13)), ((17, 13), (9, 7)),
                                          ((41, 41), (31, 21)), ((5, 5), (1, 3))])
def test_resize_bilinear_matches_reference(in_hw, out_hw):
    x = np.random.RandomState(3).randn(2, *in_hw, 3).astype(np.float32)
    got = layers.resize_bilinear(jnp.asarray(x), out_hw)
    np.testing.assert_allclose(got, numpy_bilinear_align_corners(x, *out_hw), rtol=1e-4,
                               atol=1e-5)


def test_resize_nearest_picks_cell_centres():
    labels = np.arange(321 * 321, dtype=np.int32).reshape(1, 321, 321)
    small = np.asarray(layers.resize_nearest(jnp.asarray(labels), (41, 41)))
    np.testing.assert_array_equal(small[0], labels[0, ::8, ::8])  # (321-1)/(41-1) = 8


def test_scaled_sizes_follow_deeplab():
    assert layers.scaled_size((321, 321), 0.75) == (241, 241)
    assert layers.scaled_size((321, 321), 0.5) == (161, 161)
    assert layers.scaled_size((513, 400), 1.0) == (513, 400)


def tiny_model_config(backbone, scales, merge, head=None):
    cfg = config_lib.base_config().model
    cfg.backbone, cfg.scales, cfg.merge = backbone, scales, merge
    cfg.num_classes, cfg.width, cfg.fc_width = 5, 1 / 16, 64
    cfg.depth = (1, 1, 1, 1, 1) if backbone == "vgg16" else (1, 1, 1, 1)
    cfg.head = head or ("largefov" if backbone == "vgg16" else "aspp_v2")
    cfg.gsag_window = 3
    return cfg


@pytest.mark.parametrize("backbone,scales,merge,head", [
    ("vgg16", (1.0,), "attention", None),
    ("vgg16", (1.0, 0.75), "avg", None),
    ("vgg16", (1.0, 0.5), "max", None),
    ("resnet101", (1.0, 0.75, 0.5), "attention", None),
    ("resnet50", (1.0, 0.5), "attention", "gsag"),  # a GSAG head inside the wrapper
])
def test_multiscale_output_shapes(backbone, scales, merge, head):
    model = build_model(tiny_model_config(backbone, scales, merge, head))
    images = jnp.asarray(np.random.RandomState(4).randn(2, 49, 41, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0),
                                                                  images)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    expected = (2, 7, 6, 5)  # ceil(49/8), ceil(41/8)
    assert out["logits"].shape == expected
    assert [m.shape for m in out["scale_logits"]] == [expected] * len(scales)
    # each branch at its own size: input ceil(49 s) x ceil(41 s), then stride 8 (ceil)
    stride8 = lambda n, s: -(-int(np.ceil(n * s - 1e-6)) // 8)  # noqa: E731
    branch_sizes = [(2, stride8(49, s), stride8(41, s), 5) for s in scales]
    assert [m.shape for m in out["branch_logits"]] == branch_sizes
    for branch, resized in zip(out["branch_logits"], out["scale_logits"]):
        np.testing.assert_allclose(layers.resize_bilinear(branch, expected[1:3]), resized,
                                   rtol=1e-5, atol=1e-5)
    # one set of network weights, whatever the number of scales
    assert set(variables["params"]) <= {"net", "attention"}
    if merge == "max" or len(scales) == 1:
        assert "attention" not in out
    else:
        assert out["attention"].shape == expected[:3] + (len(scales),)
        np.testing.assert_allclose(out["attention"].sum(-1), 1.0, rtol=1e-5)
    if len(scales) > 1:
        weights = out.get("attention")
        merged = scale_attention.merge_scales(jnp.stack(out["scale_logits"]), merge, weights)
        np.testing.assert_allclose(out["logits"], merged, rtol=1e-5, atol=1e-5)
    if merge == "avg":
        np.testing.assert_allclose(out["attention"], 1 / len(scales), rtol=1e-6)


def test_scales_must_contain_one():
    model = build_model(tiny_model_config("vgg16", (0.75, 0.5), "avg"))
    with pytest.raises(ValueError, match="1.0"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 17, 17, 3)), train=False)
