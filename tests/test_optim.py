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


@pytest.mark.parametrize("bn_frozen", [True, False])
def test_first_update_matches_hand_computed(bn_frozen):
    cfg = config_lib.base_config().optim
    cfg.base_lr, cfg.weight_decay, cfg.new_layer_lr_mult = 0.1, 0.01, 10.0
    tx, _ = optim.create_optimizer(cfg, total_steps=100, bn_frozen=bn_frozen)
    params, grads = params_and_grads()
    updates, _ = tx.update(grads, tx.init(params), params)
    up = jax.tree_util.tree_map(np.asarray, updates)
    lr = 0.1
    # pretrained kernel: -lr (g + wd w); bias: no decay
    np.testing.assert_allclose(up["net"]["backbone"]["conv1_1"]["kernel"], -lr * (0.5 + 0.01))
    np.testing.assert_allclose(up["net"]["backbone"]["conv1_1"]["bias"], -lr * 0.5)
    # new layers (fc8, attention): 10x
    np.testing.assert_allclose(up["net"]["largefov"]["fc8"]["kernel"], -10 * lr * (0.5 + 0.02))
    np.testing.assert_allclose(up["attention"]["conv1"]["bias"], -10 * lr * 0.5)
    bn = up["net"]["backbone"]["bn1"]["scale"]
    np.testing.assert_allclose(bn, 0.0 if bn_frozen else -lr * 0.5)


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
