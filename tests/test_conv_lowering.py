"""How convolutions are lowered: dilated ones as space-to-batch or taps, 1x1 ones as
matrix products, checked against numpy and XLA's own convolution, forward and
backward, alone and inside whole models; backbone rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_reference import np_conv
from scaleattn import config as config_lib
from scaleattn import models
from scaleattn.models import layers

REWRITES = ("space_to_batch", "taps")

# (height, width, in, out, kernel, rate, groups): odd sizes, rates that do not divide
# the size, rates at and beyond the size (taps wholly in the padding), a 5x5 kernel,
# a grouped conv (space-to-batch only).
CASES = [
    (9, 7, 4, 5, 3, 2, 1),
    (13, 13, 6, 3, 3, 12, 1),
    (13, 11, 6, 3, 3, 24, 1),
    (5, 8, 3, 4, 3, 5, 1),
    (10, 9, 4, 6, 5, 3, 1),
    (9, 9, 8, 8, 3, 4, 4),
]


def conv_module(impl, cout, k, rate, groups):
    return layers.conv(cout, k, dilation=rate, groups=groups, use_bias=True, dilated_conv=impl)


def init(module, x):
    return module.init(jax.random.PRNGKey(0), x)


def with_impls(impls):
    """(impl, *case) for every case an impl supports ('taps' has no grouped form; that
    it raises is tested in `test_bad_uses_raise`)."""
    return [(impl, *case) for impl in impls for case in CASES
            if not (impl == "taps" and case[-1] > 1)]


@pytest.mark.parametrize("impl, h, w, cin, cout, k, rate, groups",
                         with_impls(("native",) + REWRITES))
def test_matches_numpy(impl, h, w, cin, cout, k, rate, groups):
    x = np.random.default_rng(1).normal(size=(2, h, w, cin)).astype(np.float32)
    module = conv_module(impl, cout, k, rate, groups)
    variables = init(module, x)
    variables = jax.tree.map(  # a non-zero bias, so that it is checked too
        lambda v: v + 0.1 if v.ndim == 1 else v, variables)
    got = jax.jit(module.apply)(variables, x)
    p = jax.tree.map(np.asarray, variables["params"])
    expected = np_conv(x.astype(np.float64), p["kernel"].astype(np.float64), 1, rate,
                       groups) + p["bias"]
    assert got.shape == (2, h, w, cout)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl, h, w, cin, cout, k, rate, groups", with_impls(REWRITES))
def test_same_parameters_and_gradients_as_native(impl, h, w, cin, cout, k, rate, groups):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, h, w, cin)).astype(np.float32)
    weights = rng.normal(size=(2, h, w, cout)).astype(np.float32)
    native, rewrite = (conv_module(i, cout, k, rate, groups) for i in ("native", impl))
    variables = init(native, x)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(init(rewrite, x))):
        np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
    assert jax.tree.structure(variables) == jax.tree.structure(init(rewrite, x))

    def grads(module):
        loss = lambda v, x: jnp.sum(module.apply(v, x) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(native)), jax.tree.leaves(grads(rewrite))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride, use_bias, size", [(1, True, (9, 7)), (2, False, (9, 7)),
                                                    (2, False, (8, 6)), (3, True, (10, 11))])
def test_pointwise_matmul_is_the_1x1_convolution(stride, use_bias, size):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, *size, 6)).astype(np.float32)
    out_h, out_w = -(-size[0] // stride), -(-size[1] // stride)
    weights = rng.normal(size=(2, out_h, out_w, 5)).astype(np.float32)
    matmul, conv = (layers.conv(5, 1, stride=stride, use_bias=use_bias, pointwise_conv=impl)
                    for impl in ("matmul", "conv"))
    assert isinstance(matmul, layers.PointwiseConv)
    variables = init(conv, x)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(init(matmul, x))):
        np.testing.assert_array_equal(a, b)
    p = jax.tree.map(np.asarray, variables["params"])
    expected = np_conv(x.astype(np.float64), p["kernel"].astype(np.float64), stride)
    got = jax.jit(matmul.apply)(variables, x)
    np.testing.assert_allclose(got, expected + p.get("bias", 0), rtol=1e-5, atol=1e-5)

    def grads(module):
        loss = lambda v, x: jnp.sum(module.apply(v, x) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(conv)), jax.tree.leaves(grads(matmul))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_space_to_batch_layout_and_inverse():
    x = np.arange(5 * 7, dtype=np.float32).reshape(1, 5, 7, 1)
    sub = np.asarray(layers.space_to_batch(jnp.asarray(x), 2))
    assert sub.shape == (4, 3, 4, 1)
    # sub-image (p, q) holds pixels (p + 2i, q + 2j), zero beyond the image
    np.testing.assert_array_equal(sub[1, :, :, 0], np.pad(x[0, 0::2, 1::2, 0], ((0, 0), (0, 1))))
    np.testing.assert_array_equal(sub[2, :, :, 0], np.pad(x[0, 1::2, 0::2, 0], ((0, 1), (0, 0))))
    back = layers.batch_to_space(jnp.asarray(sub), 2, (5, 7))
    np.testing.assert_array_equal(back, x)


def test_live_taps():
    assert layers.live_taps(3, 12, 13) == [0, 1, 2]   # offsets -12, 0, 12 < 13
    assert layers.live_taps(3, 13, 13) == [1]         # +-13 only reads the padding
    assert layers.live_taps(3, 24, 41) == [0, 1, 2]
    assert layers.live_taps(5, 2, 3) == [1, 2, 3]     # offsets -4 -2 0 2 4 on a size-3 axis


def test_bad_uses_raise():
    x = jnp.zeros((1, 9, 9, 4))
    with pytest.raises(ValueError, match="grouped"):
        init(conv_module("taps", 4, 3, 2, 2), x)
    with pytest.raises(ValueError, match="dilated_conv"):
        init(conv_module("im2col", 4, 3, 2, 1), x)
    with pytest.raises(ValueError, match="pointwise_conv"):
        layers.conv(4, 1, pointwise_conv="fft")
    with pytest.raises(ValueError, match="stride 1"):
        layers.conv(4, 3, stride=2, dilation=2, dilated_conv="taps")
    config = config_lib.recipe("demo")
    config.model.dilated_conv = "fft"
    with pytest.raises(config_lib.ConfigError, match="model.dilated_conv"):
        config_lib.validate(config)
    config = config_lib.recipe("demo")
    config.model.remat = True
    with pytest.raises(config_lib.ConfigError, match="model.remat"):
        config_lib.validate(config)


def tiny_model_config(backbone, head, **model):
    config = config_lib.recipe("voc_s3" if backbone == "vgg16" else "voc_r101_s3")
    config.model.head, config.model.width, config.model.num_classes = head, 1 / 16, 5
    config.model.depth = (1, 1, 1, 1) if backbone.startswith("res") else (1, 1, 1, 1, 2)
    config.model.scales = (1.0, 0.5)
    for key, value in model.items():
        config.model[key] = value
    return config.model


def model_outputs_and_grads(model_config, images, labels):
    model = models.build_model(model_config)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)

    def loss(params):
        out = model.apply({**variables, "params": params}, images, train=False)
        return jnp.sum(jax.nn.log_softmax(out["logits"]) * labels), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return out, grads


def test_whole_model_unchanged():
    """A whole multi-scale ResNet-ASPP model gives the same logits, attention and
    gradients with its dilated convs (rates 2, 4 and 6-24 on 7 x 6 maps) run as
    space-to-batch and its bottleneck blocks rematerialised."""
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(2, 49, 41, 3)), jnp.float32)
    labels = jnp.asarray(rng.normal(size=(2, 7, 6, 5)), jnp.float32)  # the logits' shape
    out, grads = model_outputs_and_grads(tiny_model_config("resnet50", "aspp_v2"),
                                         images, labels)
    out2, grads2 = model_outputs_and_grads(
        tiny_model_config("resnet50", "aspp_v2", dilated_conv="space_to_batch", remat=True),
        images, labels)
    for key in ("logits", "attention"):
        np.testing.assert_allclose(out2[key], out[key], rtol=1e-4, atol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(grads2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_remat_puts_the_blocks_behind_optimization_barriers():
    """With model.remat every bottleneck block is recomputed in the backward pass:
    the lowered gradient holds one optimisation barrier per block, none without."""
    from scaleattn.models import resnet  # pylint: disable=import-outside-toplevel
    x = jnp.zeros((1, 33, 33, 3))

    def lowered_gradient(remat):
        model = resnet.resnet("resnet50", depth=(1, 2, 1, 1), width=1 / 16, remat=remat)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
        variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
        loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=False))
        return jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()

    assert "optimization_barrier" not in lowered_gradient(False)
    assert lowered_gradient(True).count("optimization_barrier") >= 5
