"""How convolutions are lowered: dilated ones as space-to-batch or taps, 1x1 ones as
matrix products, checked against numpy and XLA's own convolution, forward and
backward, alone and inside whole models; backbone rematerialisation."""

import flax.linen as nn
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
    config = config_lib.recipe("voc" if backbone == "vgg16" else "voc_r101")
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


# ------------------------------------------------------- 'auto' and folded batch norm ---


def test_auto_resolves_per_platform_from_the_table():
    assert config_lib.base_config().model.dilated_conv == "auto"
    assert config_lib.recipe("voc_r101").model.dilated_conv == "auto"
    assert layers.resolve_dilated_conv("auto", "cpu") == "native"
    assert jax.default_backend() == "cpu"
    assert layers.resolve_dilated_conv("auto") == "native"
    for platform, (impl, source) in layers.DILATED_CONV_AUTO.items():
        assert impl in layers.DILATED_CONV_IMPLS and source, platform
        assert layers.resolve_dilated_conv("auto", platform) == impl
    assert layers.resolve_dilated_conv("auto", "some_new_chip") == "native"
    assert layers.resolve_dilated_conv("taps", "cpu") == "taps"
    with pytest.raises(ValueError, match="dilated_conv"):
        layers.resolve_dilated_conv("im2col")


def test_auto_builds_the_native_model_on_cpu():
    """The model built from 'auto' is the native one: same lowered computation (a
    ResNet-ASPP with dilated convs in the backbone and the head)."""
    x = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)

    def lowered(impl):
        model = models.build_model(tiny_model_config("resnet50", "aspp_v2", dilated_conv=impl))
        variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
        return str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))

    assert lowered("auto") == lowered("native") != lowered("space_to_batch")


@pytest.mark.parametrize("impl, k, stride, rate, groups", [
    ("native", 3, 1, 1, 1), ("native", 3, 2, 1, 2), ("native", 3, 1, 3, 1),
    ("native", 1, 2, 1, 1), ("space_to_batch", 3, 1, 3, 2), ("taps", 3, 1, 4, 1)])
def test_a_scale_multiplies_the_kernel(impl, k, stride, rate, groups):
    """``scale`` given to a conv's call: ``(conv(x) + bias) * scale`` (numpy), the
    parameters those of `nn.Conv`."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 9, 7, 4)).astype(np.float32)
    scale = rng.normal(size=(6,)).astype(np.float32)
    module = layers.conv(6, k, stride=stride, dilation=rate, groups=groups, use_bias=True,
                         dilated_conv=impl, scalable=True)
    reference = layers.conv(6, k, stride=stride, dilation=rate, groups=groups, use_bias=True)
    variables = init(module, x)
    for a, b in zip(jax.tree.leaves(init(reference, x)), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    variables = jax.tree.map(lambda v: v + 0.1 if v.ndim == 1 else v, variables)
    p = jax.tree.map(np.asarray, variables["params"])
    expected = (np_conv(x.astype(np.float64), p["kernel"].astype(np.float64), stride, rate,
                        groups) + p["bias"]) * scale
    got = jax.jit(module.apply)(variables, x, scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x),
                               jax.jit(reference.apply)(variables, x), rtol=1e-6, atol=1e-6)


def random_batch_norm_statistics(variables, seed=5):
    """Non-trivial batch-norm variables: scale, bias, mean ~ N, var ~ U(0.5, 2)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "'bn" not in name:
            return x
        if name.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.5, x.shape) + (name.endswith("['scale']")),
                           x.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def tiny_bn_modules(fold, bn_mode):
    """``[(name, module, input shape)]``: every module with conv + BN pairs, tiny."""
    # pylint: disable-next=import-outside-toplevel
    from scaleattn.models import resnet, scale_attention, self_attention
    common = dict(bn_mode=bn_mode, fold_bn=fold)
    return [
        ("resnet", resnet.resnet("resnet50", depth=(1, 1, 1, 1), width=1 / 16, **common),
         (2, 33, 33, 3)),
        ("gsag", self_attention.GSAGHead(num_classes=5, variant="hybrid", channels=16,
                                         window=3, **common), (2, 5, 5, 12)),
        ("alpha", scale_attention.ScaleAlphaHead(8, **common), (2, 5, 5, 12)),
    ]


def folded_and_unfolded(bn_mode, train, with_grads):
    """For each of `tiny_bn_modules`, unfolded and folded ``(variables, output,
    gradients)``, with random batch-norm variables; ``gradients`` of a random linear
    loss on the output with respect to every parameter (None without)."""
    results = []
    for unfolded, folded in zip(tiny_bn_modules(False, bn_mode), tiny_bn_modules(True, bn_mode)):
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.normal(size=unfolded[2]), jnp.float32)
        pair = []
        for name, module, _ in (unfolded, folded):
            variables = jax.jit(lambda key, x, module=module: module.init(key, x, train=False))(
                jax.random.PRNGKey(0), x)
            variables = random_batch_norm_statistics(variables)

            def loss(params):
                out = module.apply({**variables, "params": params}, x, train=train)
                out = out["logits"] if isinstance(out, dict) else out
                weights = np.random.default_rng(8).normal(size=out.shape)
                return jnp.sum(out * weights), out

            if with_grads:
                (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
                    variables["params"])
            else:
                out, grads = jax.jit(loss)(variables["params"])[1], None
            pair.append((variables, out, grads))
        results.append((name, *pair))
    return results


def assert_same_model(name, unfolded, folded):
    (variables, out, _), (folded_variables, folded_out, _) = unfolded, folded
    assert jax.tree.structure(folded_variables) == jax.tree.structure(variables), name
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(folded_variables)):
        np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(out)).max() > 0, name
    np.testing.assert_allclose(folded_out, out, rtol=1e-4, atol=1e-5, err_msg=name)


def test_folded_frozen_batch_norm_is_the_batch_norm():
    """Frozen batch norm folded into the conv before it (ResNet, the GSAG hybrid head,
    the hierarchical alpha head: every conv + BN pair) computes what separate
    `nn.BatchNorm` layers do: the same parameter tree, train-mode outputs and gradients
    of a loss with respect to every parameter, the batch-norm ones included."""
    for name, unfolded, folded in folded_and_unfolded("frozen", train=True, with_grads=True):
        assert_same_model(name, unfolded, folded)
        grads, folded_grads = unfolded[2], folded[2]
        bn_grads = [g for p, g in jax.tree_util.tree_leaves_with_path(grads)
                    if "'bn" in jax.tree_util.keystr(p)]
        assert bn_grads and max(np.abs(np.asarray(g)).max() for g in bn_grads) > 0, name
        assert jax.tree.structure(folded_grads) == jax.tree.structure(grads)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(folded_grads)):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4,
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")


def test_trained_batch_norm_is_folded_at_inference():
    for name, unfolded, folded in folded_and_unfolded("train", train=False, with_grads=False):
        assert_same_model(name, unfolded, folded)


def test_the_model_config_switches_folding():
    """``model.fold_frozen_bn`` reaches every module that has conv + BN pairs."""
    for fold in (True, False):
        model = models.build_model(tiny_model_config(
            "resnet50", "gsag", merge="hierarchical", fold_frozen_bn=fold))
        seen = {}

        def record(next_fun, args, kwargs, context):
            if hasattr(context.module, "fold_bn"):
                seen.setdefault(type(context.module).__name__, set()).add(
                    context.module.fold_bn)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                           jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32))
        assert set(seen) >= {"ResNet", "Bottleneck", "GSAGHead", "VectorMapping",
                             "ScaleAlphaHead"}
        assert all(values == {fold} for values in seen.values()), seen


def activation_ops(jaxpr, batch):
    """Names of the equations (nested ones included) whose output is a 4-D array with
    ``batch`` rows: the passes over activations (kernels have 1, 3 or 7 rows)."""
    names = []
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            shape = getattr(out.aval, "shape", ())
            if len(shape) == 4 and shape[0] == batch:
                names.append(eqn.primitive.name)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                names += activation_ops(inner, batch)
    return names


def test_folded_model_has_no_normalisation_pass():
    """Folded, a frozen ResNet's forward has no subtract or multiply over activations:
    each batch norm became a rescaled kernel and one add (unfolded: x - mean, times
    the scale, plus the offset, for each of its 13 batch norms)."""
    from scaleattn.models import resnet  # pylint: disable=import-outside-toplevel
    x = jax.ShapeDtypeStruct((2, 17, 17, 3), jnp.float32)

    def ops(fold):
        model = resnet.resnet("resnet50", depth=(1, 1, 1, 1), width=1 / 16, fold_bn=fold)
        variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True))(variables, x)
        names = activation_ops(jaxpr.jaxpr, 2)
        return {op: names.count(op) for op in ("sub", "mul", "add")}

    unfolded, folded = ops(False), ops(True)
    assert unfolded["sub"] >= 13 and unfolded["mul"] >= 13
    assert folded["sub"] == folded["mul"] == 0
    assert folded["add"] == unfolded["add"]
