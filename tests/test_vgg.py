"""VGG16 with batch norm (`model.vgg_batch_norm`, the demo's trunk) against references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn.models import vgg

WIDTH, DEPTH = 1 / 16, (1, 1, 1, 1, 1)   # 4, 8, 16, 32, 32 channels


def trunk(**kwargs):
    return vgg.VGG16(width=WIDTH, depth=DEPTH, **kwargs)


def images(seed=0, batch=2, size=17):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def test_layout_has_a_batch_norm_per_convolution_and_no_conv_bias():
    variables = trunk(batch_norm=True, bn_mode="train").init(
        jax.random.PRNGKey(0), images(), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    names = [f"conv{b}_1" for b in range(1, 6)]
    assert sorted(k for k in params if k.startswith("conv")) == names
    for b, name in enumerate(names, start=1):
        assert set(params[name]) == {"kernel"}
        channels = params[name]["kernel"].shape[-1]
        assert params[f"bn{b}_1"]["scale"].shape == (channels,)
        assert set(stats[f"bn{b}_1"]) == {"mean", "var"}


def test_at_initial_statistics_inference_equals_the_plain_trunk():
    """Running mean 0, variance 1, scale 1, offset 0: each batch norm divides by
    sqrt(1 + eps) only, so the trunk is the plain VGG16 with the same kernels and
    zero biases."""
    x = images()
    bn_net = trunk(batch_norm=True, bn_mode="train")
    bn_vars = bn_net.init(jax.random.PRNGKey(1), x, train=False)
    plain = trunk()
    plain_params = jax.tree_util.tree_map(np.zeros_like, plain.init(
        jax.random.PRNGKey(2), x, train=False)["params"])
    for name, conv in plain_params.items():
        conv["kernel"] = bn_vars["params"][name]["kernel"]
    want = plain.apply({"params": plain_params}, x, train=False)
    got = bn_net.apply(bn_vars, x, train=False)
    assert got.shape == want.shape == (2, 3, 3, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_training_updates_running_statistics_from_the_batch():
    """bn1_1's new running mean is 0.9 * 0 + 0.1 * the batch mean of conv1_1's output,
    computed here with numpy (3x3, padding 1)."""
    x = images(seed=3, size=9)
    net = trunk(batch_norm=True, bn_mode="train")
    variables = net.init(jax.random.PRNGKey(4), x, train=False)
    _, updated = net.apply(variables, x, train=True, mutable=["batch_stats"])
    kernel = np.asarray(variables["params"]["conv1_1"]["kernel"], np.float64)  # [3,3,3,C]
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(np.einsum("bhwc,cd->bhwd", padded[:, dy:dy + 9, dx:dx + 9], kernel[dy, dx])
              for dy in range(3) for dx in range(3))
    np.testing.assert_allclose(updated["batch_stats"]["bn1_1"]["mean"],
                               0.1 * out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # with batch statistics the output differs from inference on the running ones
    train_out, _ = net.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(train_out, net.apply(variables, x, train=False), atol=1e-3)


def test_folded_and_unfolded_batch_norm_agree():
    x = images(seed=5)
    net = trunk(batch_norm=True, bn_mode="frozen")
    variables = net.init(jax.random.PRNGKey(6), x, train=False)
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map(
        lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), variables["batch_stats"])
    variables = {**variables, "batch_stats": stats}
    folded = net.apply(variables, x, train=True)
    unfolded = trunk(batch_norm=True, bn_mode="frozen", fold_bn=False).apply(
        variables, x, train=True)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)


def test_config_refuses_imagenet_weights_it_has_no_file_for():
    cfg = config_lib.base_config()
    cfg.model.vgg_batch_norm, cfg.model.init_from = True, "imagenet"
    with pytest.raises(config_lib.ConfigError, match="no converted ImageNet file"):
        config_lib.validate(cfg)
    cfg.model.backbone, cfg.model.head = "resnet50", "aspp_v2"  # its own batch norm
    config_lib.validate(cfg)
