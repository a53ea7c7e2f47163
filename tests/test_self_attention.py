"""GSAG pieces and the whole GSAG head against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn.models.self_attention import (GatedPooling, GSAGHead, KeyQueryValue,
                                             VectorMapping, attention_context,
                                             pooled_attention, pooling_statistics,
                                             split_key_query)


def random_variables(module, *inputs, seed=0, **kwargs):
    """Variables of ``module`` drawn with numpy: N(0, 1/fan_in) kernels, N(0, 0.3) biases,
    random BN statistics (faster than a jitted `init`, whose RNG is slow to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: module.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, *inputs, **kwargs))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.normal(0, 0.3, leaf.shape)          # bias, mean
    return jax.tree_util.tree_map_with_path(lambda p, l: draw(p, l).astype(np.float32),
                                            shapes)


def features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---- numpy references ---------------------------------------------------------------

def np_softmax(logits, mask=None):
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_relu(x):
    return np.maximum(x, 0)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_dense(x, p):
    """A 1x1 conv (kernel [1, 1, Cin, Cout]) or dense layer (kernel [Cin, Cout])."""
    kernel = p["kernel"].reshape(-1, p["kernel"].shape[-1]).astype(np.float64)
    return x @ kernel + p.get("bias", 0)


def np_conv3x3(x, kernel):
    """'Same' 3x3 convolution, zero padding 1, no bias: ``[B,h,w,Cin] -> [B,h,w,Cout]``."""
    b, h, w, _ = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
               for dy in range(3) for dx in range(3))


def np_batch_norm(x, p, s):
    return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def np_window_mask(h, w, window):
    """``[hw, hw]``: position j is inside the window centred on position i."""
    ys, xs = np.divmod(np.arange(h * w), w)
    r = window // 2
    return ((np.abs(ys[:, None] - ys[None]) <= r) & (np.abs(xs[:, None] - xs[None]) <= r))


def np_key_query_value(x, p):
    """``(key_query, value)`` of the two 1x1 linear layers."""
    return np_dense(x.astype(np.float64), p["key_query"]), np_dense(x.astype(np.float64),
                                                                   p["value"])


def np_attention(key_query, value, form, window=None):
    """The context map of each form, written from its definition."""
    b, h, w, two_d = key_query.shape
    d = two_d // 2
    key = key_query[..., :d].reshape(b, h * w, d)
    query = key_query[..., d:].reshape(b, h * w, d)
    v = value.reshape(b, h * w, -1)
    if form == "pooled":
        # One query per image (the mean of the queries) scores every key; the context is
        # the attention-weighted mean of all values, the same vector at every position.
        weights = np_softmax(np.einsum("bd,bnd->bn", query.mean(1), key) / np.sqrt(d))
        context = np.einsum("bn,bnv->bv", weights, v)
        return np.broadcast_to(context[:, None, None], value.shape)
    mask = None if form == "non_local" else np_window_mask(h, w, window)
    logits = np.einsum("bnd,bmd->bnm", query, key) / np.sqrt(d)
    return np.einsum("bnm,bmv->bnv", np_softmax(logits, mask), v).reshape(value.shape)


def np_pooling_statistics(x, window):
    b, h, w, c = x.shape
    r = window // 2
    local_mean, local_var = np.zeros(x.shape), np.zeros(x.shape)
    for i in range(h):
        for j in range(w):
            patch = x[:, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].astype(np.float64)
            local_mean[:, i, j] = patch.mean((1, 2))
            local_var[:, i, j] = patch.var((1, 2))
    global_mean = np.broadcast_to(x.mean((1, 2), keepdims=True), x.shape)
    global_var = np.broadcast_to(x.var((1, 2), keepdims=True), x.shape)
    return local_mean, local_var, global_mean, global_var


def np_vector_mapping(key_query, context, p, s):
    hidden = np_relu(np_dense(np.concatenate([key_query, context], -1), p["dense"]))
    return np_relu(np_batch_norm(np_dense(hidden, p["conv"]), p["bn"], s["bn"]))


def np_gated_pooling(x, p, window):
    stats = np.concatenate(np_pooling_statistics(x, window), -1)
    return x * np_sigmoid(np_dense(stats, p["gate"]))


def np_gsag_head(x, variables, variant, window, global_attention="pooled"):
    """The GSAG head's forward pass in inference mode, written from its description."""
    p, s = variables["params"], variables["batch_stats"]
    # Key layer.
    x1 = np_relu(np_batch_norm(np_conv3x3(x, p["key_conv"]["kernel"]), p["bn_key"],
                               s["bn_key"]))
    out = x1
    if variant != "basic":
        # Query layer: pointwise attention on the key layer's key, query and value.
        key_query, value = np_key_query_value(x1, p["key_qkv"])
        out = x1 + np_dense(np_attention(key_query, value, "pointwise", window),
                            p["pointwise_proj"])
    if variant == "hybrid":
        # Attention-mean-pool layer: global context, mapped back, added; gated intensity.
        key_query, value = np_key_query_value(out, p["global_qkv"])
        context = np_attention(key_query, value, global_attention)
        out = out + np_vector_mapping(key_query, context, p["vector_mapping"],
                                      s["vector_mapping"])
        out = np_gated_pooling(out, p["gated_pooling"], window)
    return np_dense(out, p["classifier"]), out


# ---- key layer's projections and the three attention forms --------------------------

def test_key_query_value_matches_numpy():
    x = features((2, 4, 5, 6))
    module = KeyQueryValue(key_channels=3, value_channels=5)
    variables = random_variables(module, x)
    key_query, value = jax.jit(module.apply)(variables, x)
    expected_kq, expected_value = np_key_query_value(x, variables["params"])
    assert key_query.shape == (2, 4, 5, 6) and value.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(key_query, expected_kq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-5)
    key, query = split_key_query(key_query)
    np.testing.assert_array_equal(key, key_query[..., :3])
    np.testing.assert_array_equal(query, key_query[..., 3:])


def test_pooled_context_is_one_attention_weighted_mean_per_image():
    """The write-up's global attention: one context vector per image, at every position,
    the attention-weighted mean of all the values."""
    rng = np.random.default_rng(1)
    key_query = rng.normal(scale=2.0, size=(3, 5, 4, 6)).astype(np.float32)
    value = rng.normal(size=(3, 5, 4, 7)).astype(np.float32)
    context = np.asarray(jax.jit(attention_context, static_argnums=2)(key_query, value,
                                                                      "pooled"))
    assert context.shape == (3, 5, 4, 7)
    np.testing.assert_array_equal(context, np.broadcast_to(context[:, :1, :1], context.shape))
    np.testing.assert_allclose(context, np_attention(key_query, value, "pooled"),
                               rtol=1e-5, atol=1e-6)
    # The weights: a distribution over the 20 positions of each image, not uniform.
    key, query = split_key_query(key_query)
    weights, vector = jax.jit(pooled_attention)(query, key, value)
    assert weights.shape == (3, 5, 4) and vector.shape == (3, 7)
    np.testing.assert_allclose(np.sum(weights, axis=(1, 2)), 1.0, rtol=1e-6)
    assert np.ptp(np.asarray(weights)) > 0.05
    np.testing.assert_allclose(vector, np.einsum("bhw,bhwv->bv", weights, value), rtol=1e-5,
                               atol=1e-6)


def test_non_local_context_matches_numpy():
    rng = np.random.default_rng(2)
    key_query = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    value = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    context = jax.jit(attention_context, static_argnums=2)(key_query, value, "non_local")
    np.testing.assert_allclose(context, np_attention(key_query, value, "non_local"),
                               rtol=1e-5, atol=1e-5)
    assert np.ptp(np.asarray(context)[0, :, :, 0]) > 0.05   # differs between positions


@pytest.mark.parametrize("shape, window", [
    ((2, 6, 5, 4), 3),
    ((1, 7, 9, 4), 5),
    ((1, 3, 2, 4), 5),   # window covers the map: every position sees all
])
def test_pointwise_attention_is_non_local_with_window_mask(shape, window):
    rng = np.random.default_rng(3)
    key_query = rng.normal(size=shape).astype(np.float32)
    value = rng.normal(size=shape[:3] + (3,)).astype(np.float32)
    context = jax.jit(attention_context, static_argnums=(2, 3))(key_query, value,
                                                                "pointwise", window)
    np.testing.assert_allclose(context, np_attention(key_query, value, "pointwise", window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form, window, match", [("pointwise", 4, "odd"),
                                                 ("global", None, "form")])
def test_bad_attention_form_or_window_fails(form, window, match):
    with pytest.raises(ValueError, match=match):
        attention_context(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 2)), form, window)


# ---- vector mapping and gated pooling ----------------------------------------------

def test_vector_mapping_matches_numpy():
    key_query, context = features((2, 3, 4, 6), seed=4), features((2, 3, 4, 5), seed=5)
    module = VectorMapping(hidden=7, features=8)
    variables = random_variables(module, key_query, context, train=False)
    out = jax.jit(lambda v, a, b: module.apply(v, a, b, train=False))(variables, key_query,
                                                                       context)
    expected = np_vector_mapping(key_query, context, variables["params"],
                                 variables["batch_stats"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # The ReLU between the dense layer and the 1x1 conv is live: without it the map
    # would be affine, and it is not.
    p, s = variables["params"], variables["batch_stats"]
    affine = np_relu(np_batch_norm(np_dense(np_dense(np.concatenate(
        [key_query, context], -1), p["dense"]), p["conv"]), p["bn"], s["bn"]))
    assert np.abs(np.asarray(out) - affine).max() > 0.05


@pytest.mark.parametrize("shape, window", [((2, 6, 7, 3), 3), ((1, 5, 4, 2), 7)])
def test_pooling_statistics_match_numpy(shape, window):
    x = features(shape, seed=6) * 2 + 1
    stats = jax.jit(pooling_statistics, static_argnums=1)(x, window)
    for got, expected in zip(stats, np_pooling_statistics(x, window)):
        assert got.shape == shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_gated_pooling_scales_feature_intensity():
    x = features((2, 5, 6, 3), seed=7)
    module = GatedPooling(window=3)
    variables = random_variables(module, x)
    out = np.asarray(jax.jit(module.apply)(variables, x))
    np.testing.assert_allclose(out, np_gated_pooling(x, variables["params"], 3),
                               rtol=1e-4, atol=1e-6)
    # features x gate, gate in (0, 1): same sign, smaller magnitude, never mixed in.
    assert np.all(np.sign(out) == np.sign(x)) and np.all(np.abs(out) < np.abs(x))


# ---- the head -----------------------------------------------------------------------

HEAD = dict(num_classes=5, channels=64, width=0.25, window=3)   # 16 channels
NEW_MODULES = {
    "basic": {"key_conv", "bn_key", "classifier"},
    "incremental": {"key_conv", "bn_key", "key_qkv", "pointwise_proj", "classifier"},
    "hybrid": {"key_conv", "bn_key", "key_qkv", "pointwise_proj", "global_qkv",
               "vector_mapping", "gated_pooling", "classifier"},
}


@pytest.mark.parametrize("variant", ["basic", "incremental", "hybrid"])
def test_head_contract(variant):
    head = GSAGHead(variant=variant, dropout=0.1, **HEAD)
    out, variables = jax.eval_shape(lambda: head.init_with_output(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)},
        jnp.zeros((2, 6, 7, 12)), train=True))
    assert out["logits"].shape == (2, 6, 7, 5)
    assert out["features"].shape == (2, 6, 7, 16)
    assert set(variables["params"]) == NEW_MODULES[variant]
    assert variables["params"]["classifier"]["kernel"].shape == (1, 1, 16, 5)
    bn_names = {path[-2].key for path, _ in
                jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
    assert all(name.startswith("bn") for name in bn_names)


@pytest.mark.parametrize("variant, global_attention", [
    ("basic", "pooled"), ("incremental", "pooled"), ("hybrid", "pooled"),
    ("hybrid", "non_local")])
def test_head_matches_numpy(variant, global_attention):
    x = features((2, 5, 6, 8), seed=9)
    head = GSAGHead(variant=variant, global_attention=global_attention, **HEAD)
    variables = random_variables(head, x, train=False, seed=3)
    out = jax.jit(lambda v, x: head.apply(v, x, train=False))(variables, x)
    logits, penultimate = np_gsag_head(x, variables, variant, HEAD["window"],
                                       global_attention)
    np.testing.assert_allclose(out["features"], penultimate, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)


def test_incremental_head_starts_as_basic_head():
    """The pointwise projection is zero-initialised: the query layer starts as identity."""
    x = features((1, 5, 5, 8), seed=8)
    incremental = GSAGHead(variant="incremental", **HEAD)
    # The 'rbg' generator compiles much faster on CPU than the default threefry.
    variables = jax.jit(lambda x: incremental.init(jax.random.key(0, impl="rbg"), x,
                                                   train=False))(x)
    basic_variables = {"params": {k: variables["params"][k]
                                  for k in NEW_MODULES["basic"]},
                       "batch_stats": variables["batch_stats"]}
    basic = GSAGHead(variant="basic", **HEAD)
    np.testing.assert_allclose(
        jax.jit(lambda v, x: incremental.apply(v, x, train=False))(variables, x)["logits"],
        jax.jit(lambda v, x: basic.apply(v, x, train=False))(basic_variables, x)["logits"],
        rtol=1e-5, atol=1e-6)


def test_head_trains_with_batch_norm_and_dropout():
    x = features((2, 4, 4, 8), seed=10)
    head = GSAGHead(variant="hybrid", bn_mode="train", dropout=0.5, **HEAD)
    variables = random_variables(head, x, train=False)

    @jax.jit
    def loss_and_stats(params, x):
        out, updates = head.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(0, impl="rbg")})
        return jnp.mean(out["logits"] ** 2), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(
        variables["params"], x)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    for name in ("global_qkv", "vector_mapping", "gated_pooling"):
        assert all(np.any(g != 0) for g in jax.tree.leaves(grads[name])), name
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                            variables["batch_stats"], stats)))


@pytest.mark.parametrize("option", [{"variant": "full"}, {"global_attention": "local"}])
def test_unknown_variant_or_global_attention_fails(option):
    with pytest.raises(ValueError, match=list(option)[0]):
        jax.eval_shape(lambda: GSAGHead(num_classes=3, **option).init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False))
