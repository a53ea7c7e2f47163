"""How the pure train/eval steps are spread over devices.

``parallel.mode``:
* ``'pmap'``: one replica of the state per local device; a local batch
  ``[b, ...]`` is laid out as ``[devices, b / devices, ...]``; gradients are summed
  and batch-norm statistics averaged over the pmap axis `AXIS`.
* ``'jit'``: plain `jax.jit` on one device (the reference the others must match).
"""

import functools

import flax.jax_utils
import jax
import numpy as np

AXIS = "batch"
MODES = ("pmap", "jit")


def axis_name(mode: str) -> str | None:
    """The collective axis the step functions see in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"parallel.mode must be one of {MODES}, got {mode!r}")
    return AXIS if mode == "pmap" else None


def num_replicas(mode: str) -> int:
    return jax.local_device_count() if mode == "pmap" else 1


def compile_step(fn, mode: str, *, donate_state: bool = True):
    """``fn(state, *args)`` compiled for ``mode`` (``fn`` must accept ``axis_name=``)."""
    step = functools.partial(fn, axis_name=axis_name(mode))
    donate = (0,) if donate_state else ()
    if mode == "pmap":
        return jax.pmap(step, axis_name=AXIS, donate_argnums=donate)
    return jax.jit(step, donate_argnums=donate)


def split_batch(batch: dict, mode: str) -> dict:
    """Local batch ``[b, ...]`` -> ``[devices, b / devices, ...]`` under pmap."""
    if mode != "pmap":
        return batch
    n = jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"the local batch ({x.shape[0]}) must divide evenly over "
                             f"{n} local devices: change batch_size")
        return np.reshape(x, (n, x.shape[0] // n) + x.shape[1:])
    return jax.tree_util.tree_map(split, batch)


def replicate(tree, mode: str):
    """Puts a host pytree on the devices the steps run on."""
    return flax.jax_utils.replicate(tree) if mode == "pmap" else jax.device_put(tree)


def unreplicate(tree, mode: str):
    """The single copy of a (replicated) device pytree."""
    return flax.jax_utils.unreplicate(tree) if mode == "pmap" else tree


def replicated_rng(rng: jax.Array, mode: str) -> jax.Array:
    """The same RNG key on every replica (steps fold in their own index)."""
    return replicate(rng, mode)
