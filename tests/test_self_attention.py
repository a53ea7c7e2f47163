"""GSAG pieces against numpy references, and the GSAG head's contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn.models.self_attention import (GatedPooling, GSAGHead, SelfAttention,
                                             VectorMapping, pooling_statistics)


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


def np_window_mask(h, w, window):
    """``[hw, hw]``: position j is inside the window centred on position i."""
    ys, xs = np.divmod(np.arange(h * w), w)
    r = window // 2
    return ((np.abs(ys[:, None] - ys[None]) <= r) & (np.abs(xs[:, None] - xs[None]) <= r))


def np_self_attention(x, params, key_channels, window=None):
    """Key-query / value attention over all positions, or those in the window."""
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c).astype(np.float64)
    kq = x @ params["key_query"]["kernel"][0, 0] + params["key_query"]["bias"]
    value = x @ params["value"]["kernel"][0, 0] + params["value"]["bias"]
    key, query = kq[..., :key_channels], kq[..., key_channels:]
    logits = np.einsum("bnd,bmd->bnm", query, key) / np.sqrt(key_channels)
    mask = None if window is None else np_window_mask(h, w, window)
    context = np.einsum("bnm,bmv->bnv", np_softmax(logits, mask), value)
    return kq.reshape(b, h, w, -1), context.reshape(b, h, w, -1)


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


# ---- self-attention -----------------------------------------------------------------

def test_global_attention_matches_numpy():
    x = features((2, 4, 5, 6))
    module = SelfAttention(key_channels=3, value_channels=5, window=None)
    variables = random_variables(module, x)
    key_query, context = jax.jit(module.apply)(variables, x)
    expected_kq, expected_context = np_self_attention(x, variables["params"], 3)
    assert key_query.shape == (2, 4, 5, 6) and context.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(key_query, expected_kq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(context, expected_context, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, window", [
    ((2, 6, 5, 4), 3),
    ((1, 7, 9, 4), 5),
    ((1, 3, 2, 4), 5),   # window covers the map: every position sees all
])
def test_pointwise_attention_is_global_attention_with_window_mask(shape, window):
    x = features(shape, seed=1)
    module = SelfAttention(key_channels=2, value_channels=3, window=window)
    variables = random_variables(module, x, seed=2)
    _, context = jax.jit(module.apply)(variables, x)
    _, expected = np_self_attention(x, variables["params"], 2, window)
    np.testing.assert_allclose(context, expected, rtol=1e-5, atol=1e-5)


def test_large_window_equals_global_module():
    x = features((2, 3, 3, 4), seed=3)
    local = SelfAttention(key_channels=2, value_channels=3, window=5)
    variables = random_variables(local, x)
    global_ = SelfAttention(key_channels=2, value_channels=3, window=None)
    np.testing.assert_allclose(jax.jit(local.apply)(variables, x)[1],
                               jax.jit(global_.apply)(variables, x)[1], rtol=1e-5, atol=1e-6)


def test_even_window_fails():
    with pytest.raises(ValueError, match="odd"):
        jax.eval_shape(lambda: SelfAttention(2, 3, window=4).init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 2))))


# ---- vector mapping and gated pooling ----------------------------------------------

def test_vector_mapping_matches_numpy():
    key_query, context = features((2, 3, 4, 6), seed=4), features((2, 3, 4, 5), seed=5)
    module = VectorMapping(hidden=7, features=8)
    variables = random_variables(module, key_query, context, train=False)
    out = jax.jit(lambda v, a, b: module.apply(v, a, b, train=False))(variables, key_query,
                                                                       context)
    p, s = variables["params"], variables["batch_stats"]["bn"]
    hidden = np.concatenate([key_query, context], -1) @ p["dense"]["kernel"] + p["dense"]["bias"]
    y = hidden @ p["conv"]["kernel"][0, 0]
    y = (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    np.testing.assert_allclose(out, np.maximum(y, 0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, window", [((2, 6, 7, 3), 3), ((1, 5, 4, 2), 7)])
def test_pooling_statistics_match_numpy(shape, window):
    x = features(shape, seed=6) * 2 + 1
    stats = jax.jit(pooling_statistics, static_argnums=1)(x, window)
    for got, expected in zip(stats, np_pooling_statistics(x, window)):
        assert got.shape == shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_gated_pooling_gate_from_statistics():
    x = features((2, 5, 6, 3), seed=7)
    module = GatedPooling(window=3)
    variables = random_variables(module, x)
    gate = jax.jit(module.apply)(variables, x)
    p = variables["params"]["gate"]
    stats = np.concatenate(np_pooling_statistics(x, 3), -1)
    expected = 1 / (1 + np.exp(-(stats @ p["kernel"][0, 0] + p["bias"])))
    np.testing.assert_allclose(gate, expected, rtol=1e-4, atol=1e-6)


# ---- the head -----------------------------------------------------------------------

HEAD = dict(num_classes=5, channels=64, width=0.25, window=3)   # 16 channels
NEW_MODULES = {
    "basic": {"key_conv", "bn_key", "classifier"},
    "incremental": {"key_conv", "bn_key", "classifier", "pointwise_attention",
                    "pointwise_proj"},
    "hybrid": {"key_conv", "bn_key", "classifier", "pointwise_attention", "pointwise_proj",
               "global_attention", "vector_mapping", "gated_pooling"},
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


def test_hybrid_features_are_the_gated_sum():
    """``features = g * x2 + (1 - g) * m``: x2 the query layer's output, m the global path."""
    x = features((2, 5, 6, 8), seed=9)
    head = GSAGHead(variant="hybrid", **HEAD)
    variables = random_variables(head, x, train=False)
    out, state = jax.jit(lambda v, x: head.apply(v, x, train=False,
                                                 capture_intermediates=True))(variables, x)
    inter = state["intermediates"]
    x2 = (jax.nn.relu(inter["bn_key"]["__call__"][0])
          + inter["pointwise_proj"]["__call__"][0])
    gate = inter["gated_pooling"]["__call__"][0]
    global_features = inter["vector_mapping"]["__call__"][0]
    np.testing.assert_allclose(out["features"], gate * x2 + (1 - gate) * global_features,
                               rtol=1e-5, atol=1e-6)
    p = variables["params"]["classifier"]
    np.testing.assert_allclose(out["logits"], out["features"] @ p["kernel"][0, 0] + p["bias"],
                               rtol=1e-4, atol=1e-5)


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
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads["global_attention"]))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                            variables["batch_stats"], stats)))


def test_unknown_variant_fails():
    with pytest.raises(ValueError, match="variant"):
        jax.eval_shape(lambda: GSAGHead(num_classes=3, variant="full").init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False))
