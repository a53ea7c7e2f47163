"""The training state: parameters, optimiser state, step and batch-norm statistics.

Shared by training (`steps`, `loop`) and inference (`inference` restores a trained
state into the template built here), so neither has to import the other.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from scaleattn import optim


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and step, plus batch-norm statistics."""
    batch_stats: Any = None


def variables_of(state: TrainState) -> dict:
    """The ``model.apply`` variables ``{'params', 'batch_stats'}`` of a state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def initializer(model, tx: optax.GradientTransformation, rng: jax.Array,
                image_shape: tuple[int, ...]) -> Callable[[], TrainState]:
    """A function of no arguments that builds a fresh state (traceable: compile it
    with `parallel.Layout.init_state`, or `jax.eval_shape` it for a template).

    The model is initialised on a zero batch ``image_shape`` (``[1, crop, crop, 3]``);
    ``rng`` seeds both the parameters and dropout.
    """
    def init() -> TrainState:
        variables = model.init({"params": rng, "dropout": rng},
                               jnp.zeros(image_shape, jnp.float32), train=False)
        return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                 batch_stats=variables.get("batch_stats", {}))
    return init


def create_train_state(config: ml_collections.ConfigDict, model, rng: jax.Array,
                       image_shape: tuple[int, ...]) -> TrainState:
    """A fresh state of ``model`` with the optimiser of ``config`` (one device)."""
    tx, _ = optim.create_optimizer(config.optim, config.train.steps,
                                   bn_frozen=config.model.bn_mode == "frozen")
    return jax.jit(initializer(model, tx, rng, image_shape))()


def template(config: ml_collections.ConfigDict, model, rng: jax.Array) -> TrainState:
    """Shapes and dtypes of a fresh state at the training crop size, nothing computed:
    what a checkpoint of ``config`` is restored into."""
    size = config.data.crop_size
    return jax.eval_shape(functools.partial(create_train_state, config, model, rng,
                                            (1, size, size, 3)))
