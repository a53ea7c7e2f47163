"""Orbax checkpoints of a training run: what is saved, what is kept, how a run resumes.

A checkpoint at step ``n`` holds everything the run needs to continue as if it had
never stopped: parameters, optimiser state, batch-norm statistics, the step, the
base RNG key, and (in ``meta``) the input position (the number of batches consumed,
which `data.pipeline.train_batches(start_step=...)` resumes from) and the config the
run was started with.

Saving is asynchronous where Orbax supports it (``train.async_checkpoints``): the
arrays are copied to host memory, then written in the background while training
goes on; `CheckpointManager.wait_until_finished` is called before the process ends.
Every process of a multi-host run takes part: a sharded state is written by the
processes that hold its shards, a host (numpy) state by process 0.

Kept: the last ``train.keep_checkpoints`` steps, plus (``train.keep_best``) the one
with the best eval mIoU (saved with ``metrics={'miou': ...}``).

Damage: Orbax writes a step to a temporary directory and renames it when complete,
so a run killed mid-save leaves a ``<step>.orbax-checkpoint-tmp-*`` directory; it is
reported and removed. A finished step whose files were damaged afterwards (deleted,
truncated) fails to read: `restore_latest` warns, naming it, moves it aside to
``workdir/checkpoints_unreadable/`` and resumes from the newest readable step. A
checkpoint of another model config is a `CheckpointError` that names the first
array that differs (and the config keys that differ), not a shape traceback.
"""

import json
import os
import time

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

TMP_MARKER = ".orbax-checkpoint-tmp"
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (another model, corrupt files)."""


def resolve_workdir(workdir: str) -> str:
    """An absolute local path, or a URL (``gs://...``) as it is."""
    if "://" in workdir:
        return workdir.rstrip("/")
    return os.path.abspath(os.path.expanduser(workdir))


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(resolve_workdir(workdir), "checkpoints")


def half_written(directory) -> list[epath.Path]:
    """Step directories a killed save left behind (Orbax's temporary names)."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if TMP_MARKER in p.name)


def make_manager(workdir: str, keep: int, *, keep_best: bool = False,
                 async_save: bool = True, training: bool = False) -> ocp.CheckpointManager:
    """A manager for ``workdir/checkpoints``: the last ``keep`` steps (+ the best mIoU).

    ``training``: the manager of the run that writes here; half-written steps (left
    by a kill during a save) are reported and removed. Readers (eval, predict) leave
    them alone: they may belong to a run that is saving right now.
    """
    directory = checkpoint_dir(workdir)
    leftovers = half_written(directory) if training else []
    if leftovers and jax.process_index() == 0:
        logging.warning("Ignoring half-written checkpoint(s) left by an interrupted save: %s "
                        "(they are removed).", ", ".join(str(p) for p in leftovers))
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_best:
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics["miou"], n=1,
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=training, enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    return ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"tree": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return str(epath.Path(manager.directory) / str(step))


def save(manager: ocp.CheckpointManager, step: int, state, rng: jax.Array,
         config: ml_collections.ConfigDict, *, metrics: dict | None = None,
         force: bool = False) -> None:
    """Saves ``state`` and ``rng`` at ``step`` (every process calls this).

    ``state`` is either host-addressable (numpy or single-device arrays, written by
    process 0) or made of global sharded arrays (each process writes its shards).
    ``metrics`` (``{'miou': ...}``) rank the checkpoint for ``keep_best``.
    """
    tree = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    meta = {"step": int(step), "data_position": int(step), "config": config.to_json()}
    manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics=metrics, force=force)


def shapes(tree) -> dict[str, tuple]:
    """``{'a/b/c': shape}`` of a nested dict of arrays or array metadata."""
    flat = flax.traverse_util.flatten_dict(tree, sep="/")
    return {k: tuple(v.shape) if hasattr(v, "shape") else np.shape(v) for k, v in flat.items()}


def config_differences(saved: dict, current: ml_collections.ConfigDict,
                       section: str = "model") -> list[str]:
    """``['model.fc_width: 64 -> 32', ...]``, the keys of ``section`` that changed."""
    before = flax.traverse_util.flatten_dict(saved.get(section, {}), sep=".")
    after = flax.traverse_util.flatten_dict(json.loads(current.to_json()).get(section, {}),
                                            sep=".")
    return [f"{section}.{k}: {before.get(k)!r} -> {after.get(k)!r}"
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def check_fits(expected: dict, saved: dict, path: str, hint: str = "") -> None:
    """Raises `CheckpointError` naming the first array whose presence or shape differs."""
    for key in sorted(set(expected) | set(saved)):
        want, got = expected.get(key), saved.get(key)
        if want != got:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {key} has shape {got}, the "
                f"model expects {want}{hint}. Use a new --workdir or the config the "
                f"checkpoint was made with.")


def check_shapes(expected, restored, path: str) -> None:
    """Raises `CheckpointError` naming the first leaf whose shape differs."""
    check_fits(shapes(expected), shapes(restored), path)


def _mismatch_hint(manager, step, config) -> str:
    if config is None:
        return ""
    try:
        _, meta = read(manager, step, tree=False)
        changed = config_differences(saved_config(meta), config)
    except Exception:  # pylint: disable=broad-except
        return ""
    return f" (it was written with {'; '.join(changed[:5])})" if changed else ""


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves unreadable steps to ``<workdir>/checkpoints_unreadable/`` (process 0).

    So that the run can save those step numbers again; the files stay for inspection.
    """
    if not steps:
        return
    directory = epath.Path(manager.directory)
    if jax.process_index() == 0:
        target = directory.parent / UNREADABLE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            source = directory / str(step)
            try:
                source.rename(target / f"{step}-{int(time.time())}")
            except OSError as e:  # e.g. object stores that cannot rename folders
                logging.warning("Cannot move %s aside (%s); deleting it.", source, e)
                source.rmtree()
    sync_processes("scaleattn_checkpoint_set_aside")
    manager.reload()


def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(name)


def restore_latest(manager: ocp.CheckpointManager, state, rng: jax.Array, *,
                   config: ml_collections.ConfigDict | None = None):
    """``(state, rng, meta)`` from the newest readable checkpoint, or ``None`` if there is none.

    ``state`` and ``rng`` are templates (the freshly initialised values, laid out as
    the restored arrays should be: single-device, or global sharded arrays). A
    checkpoint whose arrays do not match them was written by another model config:
    `CheckpointError`, naming the array (and, given ``config``, the model keys that
    changed). A checkpoint that cannot be read is skipped with a warning naming it and
    set aside; the next older one is used. If none can be read: `CheckpointError`.
    """
    target = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    expected = shapes(target)
    abstract = jax.tree_util.tree_map(  # numpy leaves come back as numpy
        lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(x), target)
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        path = step_path(manager, step)
        try:
            saved = shapes(manager.item_metadata(step)["tree"].tree)
        except Exception as e:  # pylint: disable=broad-except
            unreadable.append((step, path, e))
            continue
        check_fits(expected, saved, path, _mismatch_hint(manager, step, config))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
            unreadable.append((step, path, e))
            continue
        check_shapes(target, restored.tree, path)
        if unreadable:
            logging.warning(
                "Checkpoint(s) %s could not be read (%s); they are moved to %s. Resuming from "
                "the previous good checkpoint %s (step %d).",
                ", ".join(p for _, p, _ in unreadable), first_line(unreadable[0][2]),
                UNREADABLE_DIR, path, step)
            set_aside(manager, [s for s, _, _ in unreadable])
        state = flax.serialization.from_state_dict(state, restored.tree["state"])
        logging.info("Restored checkpoint %s (step %d).", path, step)
        return state, restored.tree["rng"], restored.meta
    if unreadable:
        raise CheckpointError(
            f"no checkpoint in {manager.directory} can be read: "
            + "; ".join(f"{p}: {first_line(e)}" for _, p, e in unreadable)
            + ". Delete them to start afresh, or restore the files.")
    return None


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:300]


def read(manager: ocp.CheckpointManager, step: int, *, tree: bool = True) -> tuple[dict, dict]:
    """``(tree, meta)`` of a checkpoint as saved (nested dicts of numpy arrays), no template.

    ``tree=False`` reads only ``meta`` (``tree`` is then ``None``).
    """
    args = {"meta": ocp.args.JsonRestore()}
    if tree:  # numpy templates: readable whatever devices or processes wrote it
        template = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype),
                                          manager.item_metadata(step)["tree"].tree)
        args["tree"] = ocp.args.StandardRestore(template)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return (restored.tree if tree else None), restored.meta


def saved_config(meta: dict) -> dict:
    """The config (as a dict) a checkpoint's run was started with."""
    return json.loads(meta["config"])
