"""Orbax checkpoints of a training run: what is saved and how a run resumes.

A checkpoint at step ``n`` holds everything the run needs to continue as if it had
never stopped: parameters, optimiser state, batch-norm statistics, the step, the
base RNG key, and (in ``meta``) the input position (the number of batches consumed,
which `data.pipeline.train_batches(start_step=...)` resumes from) and the config the
run was started with. Orbax writes each step to a temporary directory and renames it
when complete, so a run killed mid-save leaves no checkpoint that looks finished.
"""

import json
import os

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (another model, corrupt files)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager for ``workdir/checkpoints`` keeping the last ``keep`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, rng: jax.Array,
         config: ml_collections.ConfigDict, *, force: bool = False) -> None:
    """Saves (unreplicated, host-addressable) ``state`` and ``rng`` at ``step``."""
    tree = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    meta = {"step": int(step), "data_position": int(step), "config": config.to_json()}
    manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)), force=force)


def restore_latest(manager: ocp.CheckpointManager, state, rng: jax.Array):
    """``(state, rng, meta)`` from the newest checkpoint, or ``None`` if there is none.

    ``state`` and ``rng`` are templates (the freshly initialised values); a checkpoint
    whose tree does not match them was written by another model config and raises a
    `CheckpointError` that says so.
    """
    step = manager.latest_step()
    if step is None:
        return None
    target = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    path = os.path.join(manager.directory, str(step))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (was it written with another "
            f"model config?): {str(e).splitlines()[0][:300]}. Use a new --workdir or the "
            f"config the checkpoint was made with.") from e
    check_shapes(target, restored.tree, path)
    state = flax.serialization.from_state_dict(state, restored.tree["state"])
    logging.info("Restored checkpoint %s (step %d).", path, step)
    return state, restored.tree["rng"], restored.meta


def check_shapes(expected, restored, path: str) -> None:
    """Raises `CheckpointError` naming the first leaf whose shape differs."""
    flat_expected = flax.traverse_util.flatten_dict(expected, sep="/")
    flat_restored = flax.traverse_util.flatten_dict(restored, sep="/")
    for key, value in flat_expected.items():
        got = flat_restored.get(key)
        if got is None or np.shape(got) != np.shape(value):
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {key} has shape "
                f"{None if got is None else np.shape(got)}, the model expects "
                f"{np.shape(value)}. Use a new --workdir or the config it was made with.")


def saved_config(meta: dict) -> dict:
    """The config (as a dict) a checkpoint's run was started with."""
    return json.loads(meta["config"])
