"""Which arrays of a pytree hold NaN or Inf: the check a state passes before it is saved
and after it is restored (`scaleattn.checkpoint`).

`nonfinite_arrays` reads every floating-point array once: on the host for numpy and
single-process arrays (the copy `parallel.Layout.saveable` hands to Orbax), on the
devices for a global array sharded over several processes (one jitted reduction per
array, only a boolean per array comes back). It runs when a checkpoint is written,
not in the training step, so the steps between checkpoints pay nothing for it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from scaleattn.checksums import flat_leaves


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)


@jax.jit
def _device_all_finite(arrays: list) -> list:
    return [jnp.all(jnp.isfinite(x)) for x in arrays]


def nonfinite_arrays(tree) -> list[str]:
    """The ``'state/params/...'`` names of the floating-point leaves of ``tree`` that hold
    a NaN or an Inf, in tree order (``[]``: all finite). Every process of a multi-host
    run must call it with the same tree (its global arrays are reduced on the devices)."""
    names, distributed = [], []
    for name, leaf in flat_leaves(tree).items():
        if not _is_float(np.result_type(getattr(leaf, "dtype", type(leaf)))):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            distributed.append((name, leaf))
        elif not np.isfinite(np.asarray(leaf)).all():
            names.append(name)
    if distributed:
        results = _device_all_finite([leaf for _, leaf in distributed])
        names += [name for (name, _), ok in zip(distributed, results) if not bool(ok)]
    order = list(flat_leaves(tree))
    return sorted(names, key=order.index)


def describe(names: list[str], limit: int = 3) -> str:
    """``'params/a, params/b and 4 more array(s)'`` (the ``state/`` prefix dropped)."""
    shown = [n.removeprefix("state/") for n in names[:limit]]
    more = f" and {len(names) - limit} more array(s)" if len(names) > limit else ""
    return ", ".join(shown) + more
