"""The paper's optimiser: 10x LR on new layers, Caffe-style decay, schedules, frozen BN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn import optim


def params_and_grads():
    params = {"net": {"backbone": {"conv1_1": {"kernel": jnp.ones((3, 3, 3, 4)),
                                               "bias": jnp.ones((4,))},
                                   "bn1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}},
                      "largefov": {"fc8": {"kernel": jnp.full((1, 1, 4, 2), 2.0),
                                           "bias": jnp.zeros((2,))}}},
              "attention": {"conv1": {"kernel": jnp.ones((3, 3, 8, 4)), "bias": jnp.ones((4,))}}}
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)
    return params, grads


@pytest.mark.parametrize("bn_frozen,bias_mult", [(True, 1.0), (False, 1.0), (True, 2.0)])
def test_first_update_matches_hand_computed(bn_frozen, bias_mult):
    cfg = config_lib.base_config().optim
    cfg.base_lr, cfg.weight_decay, cfg.new_layer_lr_mult = 0.1, 0.01, 10.0
    cfg.bias_lr_mult = bias_mult
    tx, _ = optim.create_optimizer(cfg, total_steps=100, bn_frozen=bn_frozen)
    params, grads = params_and_grads()
    updates, _ = tx.update(grads, tx.init(params), params)
    up = jax.tree_util.tree_map(np.asarray, updates)
    lr = 0.1
    # pretrained kernel: -lr (g + wd w); bias: no decay
    np.testing.assert_allclose(up["net"]["backbone"]["conv1_1"]["kernel"], -lr * (0.5 + 0.01))
    np.testing.assert_allclose(up["net"]["backbone"]["conv1_1"]["bias"], -bias_mult * lr * 0.5)
    # new layers (fc8, attention): 10x
    np.testing.assert_allclose(up["net"]["largefov"]["fc8"]["kernel"], -10 * lr * (0.5 + 0.02))
    np.testing.assert_allclose(up["attention"]["conv1"]["bias"], -10 * bias_mult * lr * 0.5)
    for leaf in ("scale", "bias"):  # a batch-norm offset is not a bias for bias_lr_mult
        np.testing.assert_allclose(up["net"]["backbone"]["bn1"][leaf],
                                   0.0 if bn_frozen else -lr * 0.5)


def test_momentum_accumulates():
    cfg = config_lib.base_config().optim
    cfg.base_lr, cfg.weight_decay = 1.0, 0.0
    tx, _ = optim.create_optimizer(cfg, total_steps=100, bn_frozen=False)
    params, grads = params_and_grads()
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    # v2 = g + 0.9 g
    np.testing.assert_allclose(updates["net"]["backbone"]["conv1_1"]["bias"], -1.9 * 0.5,
                               rtol=1e-6)


def test_step_schedule_is_caffe_step_policy():
    cfg = config_lib.base_config().optim
    schedule = optim.learning_rate_schedule(cfg, 6000)
    for step, expected in [(0, 1e-3), (1999, 1e-3), (2000, 1e-4), (3999, 1e-4), (4000, 1e-5)]:
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-5)


def test_poly_schedule():
    cfg = config_lib.base_config().optim
    cfg.schedule, cfg.base_lr, cfg.poly_power = "poly", 0.01, 0.9
    schedule = optim.learning_rate_schedule(cfg, 1000)
    for step in (0, 250, 999, 1000):
        np.testing.assert_allclose(schedule(step), 0.01 * (1 - step / 1000) ** 0.9, rtol=1e-4,
                                   atol=1e-12)


def test_unknown_schedule_names_the_key():
    cfg = config_lib.base_config().optim
    cfg.schedule = "cosine"
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.learning_rate_schedule(cfg, 10)


def effective_learning_rates(config, params) -> dict[str, float]:
    """Each parameter's learning rate in units of optim.base_lr, read off the optimiser's
    first update for a unit gradient (no decay, no momentum history)."""
    cfg = config.optim
    cfg.weight_decay = 0.0
    tx, _ = optim.create_optimizer(cfg, total_steps=config.train.steps,
                                   bn_frozen=config.model.bn_mode == "frozen")
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    return {"/".join(k.key for k in path): float(-np.asarray(u).reshape(-1)[0]) / cfg.base_lr
            for path, u in flat}


@pytest.mark.parametrize("recipe", ["voc", "voc_r101"])
def test_recipe_learning_rates_are_caffe_deeplab(recipe):
    """DeepLab's prototxts: weights 1x, biases 2x, the new layers (fc8 / ASPP and the
    attention head) 10x with their biases 20x, frozen batch norm 0."""
    from scaleattn.models import build_model
    config = config_lib.recipe(recipe)
    config.model.width, config.model.fc_width, config.model.attention_width = 1 / 32, 64, 32
    config.model.depth = (1, 1, 1, 1, 1) if recipe == "voc" else (1, 1, 1, 1)
    model = build_model(config.model)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 33, 33, 3)), train=False))
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params["params"])
    rates = effective_learning_rates(config, params)
    expected = {}
    for path in rates:
        new = "/fc8/" in path or "/aspp" in path or path.startswith("attention/")
        bias = path.endswith("/bias") and "/bn" not in path
        frozen_bn = "/bn" in path
        expected[path] = 0.0 if frozen_bn else (10.0 if new else 1.0) * (2.0 if bias else 1.0)
    assert {p: r for p, r in rates.items() if r != pytest.approx(expected[p])} == {}
    seen = {abs(round(r, 4)) for r in rates.values()}
    # Every group is present: VGG's convs have biases; the ResNet's have none (batch
    # norm instead, frozen).
    assert seen == ({20.0, 10.0, 2.0, 1.0} if recipe == "voc" else {20.0, 10.0, 1.0, 0.0})
