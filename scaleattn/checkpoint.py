"""Orbax checkpoints of a training run: what is saved, how it is verified, how a run resumes.

A checkpoint at step ``n`` holds everything the run needs to continue as if it had
never stopped: parameters, optimiser state, batch-norm statistics, the step, the
base RNG key, and (in ``meta``) the input position (the number of batches consumed,
which `data.pipeline.train_batches(start_step=...)` resumes from), the config the
run was started with and the checksums of every saved array.

Saving is asynchronous where Orbax supports it (``train.async_checkpoints``): the
arrays are copied to host memory, then written in the background while training
goes on; `CheckpointManager.wait_until_finished` is called before the process ends.
Every process of a multi-host run takes part: a sharded state is written by the
processes that hold its shards, a host (numpy) state by process 0.

Kept: the last ``train.keep_checkpoints`` steps, plus (``train.keep_best``) the one
with the best eval mIoU (saved with ``metrics={'miou': ...}``).

Integrity. `save` computes a checksum of every array (`tree_checksums`: two 32-bit
position-weighted sums of its bytes, `scaleattn.checksums`: the same value from a numpy
copy, a device array or the shards of a global array) from the very copy handed to Orbax, and writes them,
with a SHA-256 of the config, into ``meta``, which Orbax commits together with the
arrays. `restore_latest` recomputes them from what it read: a step whose bytes changed
after it was written (same size or not), whose files are missing or truncated, or that
was left half-written is *damaged*. The training run (``writable``) names it, moves it
aside to ``workdir/checkpoints_unreadable/`` and resumes from the newest good step;
a reader (eval, predict, analyze) stops with one line naming it, or with ``fallback``
uses the newest good step, and never changes the workdir. A killed save leaves a
``<step>.orbax-checkpoint-tmp-*`` directory: never listed as a step, removed by the
next training run.

The saved config is the truth of a trained run: its model-defining keys (class
``model`` of `scaleattn.identity`, the one table of what identifies a run) must equal
the current config's, or `restore_latest` stops with a `CheckpointError` naming each
key, its saved and its current value.
"""

import hashlib
import json
import logging as std_logging
import os
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from scaleattn import finite, identity, outputs
from scaleattn.checksums import CHECKSUM_FORMAT, tree_checksums

TMP_MARKER = ".orbax-checkpoint-tmp"
UNREADABLE_DIR = "checkpoints_unreadable"

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (another model, damaged or missing files)."""


class DamagedCheckpoint(CheckpointError):
    """A step whose files cannot be read or whose arrays fail their checksums."""
    what = "is damaged"
    fix = ("Restore its files, delete the step, or pass --checkpoint_fallback to use the "
           "newest good step.")


class NonFiniteCheckpoint(DamagedCheckpoint):
    """A step whose arrays hold NaN or Inf (saved by an older version, which did not
    check): read like a damaged one, never used."""
    what = "holds NaN/Inf values"
    fix = ("It is the state of a diverged run: delete the step, or pass "
           "--checkpoint_fallback to use the newest finite step.")


class NonFiniteState(CheckpointError):
    """A state with NaN/Inf arrays handed to `save`: refused, nothing is written.
    ``names``: the arrays (``'state/params/...'``)."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


class StepMismatch(CheckpointError):
    """A step directory whose saved step differs from its name (renamed or copied by hand)."""


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
    by a kill during a save) are reported and removed. Otherwise a read-only manager
    (eval, predict, analyze, tests): it creates, moves and deletes nothing, and leaves
    half-written steps alone (they may belong to a run that is saving right now).
    """
    directory = checkpoint_dir(workdir)
    leftovers = half_written(directory) if training else []
    if leftovers and jax.process_index() == 0:
        logging.warning("Ignoring half-written checkpoint(s) left by an interrupted save: %s "
                        "(they are removed).", ", ".join(str(p) for p in leftovers))
        for path in leftovers:
            path.rmtree(missing_ok=True)
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_best:
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics["miou"], n=1,
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=training, read_only=not training, cleanup_tmp_directories=training,
        save_interval_steps=1 if training else 0,
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    return ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"tree": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def open_for_reading(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of ``workdir``'s checkpoints; `CheckpointError` if it has none."""
    manager = make_manager(workdir, 1)
    if not manager.all_steps():
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first "
                              f"(--mode=train) or point --workdir at a trained run.")
    return manager


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return str(epath.Path(manager.directory) / str(step))


def config_digest(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()


# -------------------------------------------------------------------------- save ---


def save(manager: ocp.CheckpointManager, step: int, state, rng: jax.Array,
         config: ml_collections.ConfigDict, *, metrics: dict | None = None,
         force: bool = False, start: str | None = None,
         position_images: int | None = None) -> None:
    """Saves ``state`` and ``rng`` at ``step`` (every process calls this).

    ``state`` is either host-addressable (numpy or single-device arrays, written by
    process 0) or made of global sharded arrays (each process writes its shards).
    The checksums are computed from this same ``state`` (the copy Orbax writes, so a
    later training step cannot change it in between) and saved in ``meta``.
    ``metrics`` (``{'miou': ...}``) rank the checkpoint for ``keep_best``; ``start``
    (where the run's first step started from) and ``position_images`` (training
    images read so far, default ``step * batch_size``) go into ``meta``. A state
    with a NaN or Inf in any array is `NonFiniteState` (nothing is written), so every
    checkpoint is a finite state a run can resume from.
    """
    tree = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    bad = finite.nonfinite_arrays(tree["state"])
    if bad:
        raise NonFiniteState(f"the state of step {step} holds NaN/Inf values in "
                             f"{finite.describe(bad)}", bad)
    config_json = config.to_json()
    meta = {"step": int(step), "data_position": int(step), "batch_size": config.batch_size,
            "data_position_images": int(step * config.batch_size if position_images is None
                                        else position_images),
            "start": start, "config": config_json,
            "config_sha256": config_digest(config_json),
            "checksum_format": CHECKSUM_FORMAT, "checksums": tree_checksums(tree)}
    manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics=metrics, force=force)


def complete_steps(directory) -> list[int]:
    """The steps whose saves finished in ``directory`` (Orbax renames a step's
    temporary folder to its number only once all of it is written)."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def write_error(manager: ocp.CheckpointManager, step: int | None,
                error: BaseException) -> CheckpointError:
    """The one-line `CheckpointError` of a save that failed (a full disk, a file-size
    limit, a store that refused the write): the step being saved, the folder, the
    reason and the newest complete checkpoint, which a rerun resumes from. (An
    asynchronous save reports its failure at the next save or wait, so the failed
    write may be an earlier step's.)"""
    reason = None
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
            break
    for text in ("No space left on device", "File too large", "Disk quota exceeded",
                 "Read-only file system", "Permission denied"):
        if reason is None and text.lower() in str(error).lower():
            reason = text
    reason = reason or first_line(error)
    # The save's other write tasks fail the same way; asyncio would log each one's
    # traceback ("Task exception was never retrieved") when it is collected, after this
    # line: the run is stopping and the failure is reported here, once.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    done = complete_steps(manager.directory)
    kept = (f"the newest complete checkpoint (step {done[-1]}) is intact and a rerun "
            f"resumes from it" if done else "no complete checkpoint was written")
    which = "" if step is None else f" at step {step}"
    return CheckpointError(
        f"cannot write checkpoints in {manager.directory} ({reason}){which}: the run "
        f"stopped; {kept}. Free space (or raise the file-size limit) there and rerun")


# ------------------------------------------------------------------------ checks ---


def shapes(tree) -> dict[str, tuple]:
    """``{'a/b/c': shape}`` of a nested dict of arrays or array metadata."""
    flat = flax.traverse_util.flatten_dict(tree, sep="/")
    return {k: tuple(v.shape) if hasattr(v, "shape") else np.shape(v) for k, v in flat.items()}


def model_differences(saved: dict, current: ml_collections.ConfigDict) -> list[tuple]:
    """``[(key, saved value, current value), ...]`` of the model-defining keys that differ
    (keys only one side has are not compared: a checkpoint of an older version)."""
    return identity.differences(saved, current, identity.is_model_defining)


def config_differences(saved: dict, current: ml_collections.ConfigDict,
                       section: str = "model") -> list[str]:
    """``['model.fc_width: 64 -> 32', ...]``, the keys of ``section`` that changed."""
    before = flax.traverse_util.flatten_dict(saved.get(section, {}), sep=".")
    after = flax.traverse_util.flatten_dict(json.loads(current.to_json()).get(section, {}),
                                            sep=".")
    return [f"{section}.{k}: {before.get(k)!r} -> {after.get(k)!r}"
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def flag_value(value) -> str:
    """A config value as a ``--config.key=...`` flag writes it (tuples in parentheses)."""
    if isinstance(value, list):
        return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def check_same_model(saved: dict, config: ml_collections.ConfigDict, path: str) -> None:
    """Raises `CheckpointError` naming every model-defining key whose saved value differs."""
    changed = model_differences(saved, config)
    if changed:
        keys = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, old, new in changed)
        flags = " ".join(f"--config.{k}={flag_value(old)}" for k, old, _ in changed)
        raise CheckpointError(
            f"checkpoint {path} was trained with another model ({keys}). The saved config is "
            f"what the checkpoint computes: run with {flags}, or use another --workdir.")


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


def verify(tree, meta: dict, path: str) -> None:
    """Raises `DamagedCheckpoint` unless ``tree`` (as read) has the checksums in ``meta``."""
    saved = meta.get("checksums")
    if saved is None:
        logging.warning("Checkpoint %s has no checksums (written by an older version): "
                        "its contents cannot be verified.", path)
        return
    if meta.get("checksum_format") != CHECKSUM_FORMAT:
        raise DamagedCheckpoint(f"unknown checksum format {meta.get('checksum_format')!r}")
    read_now = tree_checksums(tree, {k: v.split("[", 1)[0] for k, v in saved.items()})
    differ = sorted(k for k in set(saved) | set(read_now) if saved.get(k) != read_now.get(k))
    if differ:
        more = f" and {len(differ) - 1} more array(s)" if len(differ) > 1 else ""
        raise DamagedCheckpoint(f"array {differ[0]} does not match the checksum saved with "
                                f"it{more} (the files changed after they were written)")


# ------------------------------------------------------------------------- reads ---


class _QuietFailedReads:
    """Drops the per-array errors an Orbax/TensorStore read of a damaged step reports
    from its threads after the restore has already failed ('Event loop is closed',
    'Encountered error while reading array ...'): the step is reported once, by name."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        text = str(unraisable.exc_value)
        if ("Event loop is closed" in text or "Encountered error while reading array" in text
                or "Error reading" in text):
            return
        self.previous(unraisable)


def quiet_failed_reads() -> None:
    """Installs `_QuietFailedReads` as ``sys.unraisablehook`` (once)."""
    if not isinstance(sys.unraisablehook, _QuietFailedReads):
        sys.unraisablehook = _QuietFailedReads(sys.unraisablehook)


def first_line(error: BaseException) -> str:
    """One line about a read error: its message up to where TensorStore dumps internals
    (with the error's type unless it is one of ours)."""
    return outputs.error_line(error, with_type=not isinstance(error, CheckpointError),
                              cut_at="See full TensorStore details")


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """A step's ``meta``, checked: `DamagedCheckpoint` if missing, unreadable or its
    config does not match the digest saved with it; `StepMismatch` if the step it was
    saved at is not the directory's name."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
        raise DamagedCheckpoint(f"its meta cannot be read ({first_line(e)})") from e
    if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
        raise DamagedCheckpoint("its meta is missing or incomplete")
    digest = meta.get("config_sha256")
    if digest is not None and digest != config_digest(meta["config"]):
        raise DamagedCheckpoint("its saved config does not match the checksum saved with it")
    if int(meta["step"]) != int(step):
        raise StepMismatch(
            f"checkpoint {step_path(manager, step)} holds the state of step {meta['step']}, "
            f"not of step {step} (its folder was renamed or copied): rename it back to "
            f"{meta['step']} or delete it; a run resumes only from a step saved under its "
            f"own number")
    return meta


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple]:
    """``{'state/params/...': shape}`` from a step's array metadata (`DamagedCheckpoint`
    if there is none)."""
    missing = DamagedCheckpoint("its array data (tree/) is missing")
    if not (epath.Path(step_path(manager, step)) / "tree").exists():
        raise missing
    try:
        item = manager.item_metadata(step)["tree"]
        if item is None:
            raise missing
        return shapes(item.tree)
    except DamagedCheckpoint:
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise DamagedCheckpoint(f"its array metadata cannot be read ({first_line(e)})") from e


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged steps to ``<workdir>/checkpoints_unreadable/`` (process 0).

    So that the run can save those step numbers again; the files stay for inspection.
    Only the training run (the one writer of the workdir) calls this.
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
                   config: ml_collections.ConfigDict | None = None,
                   writable: bool = False, fallback: bool | None = None, retries: int = 3):
    """``(state, rng, meta)`` from the newest good checkpoint, or ``None`` if there is none.

    ``state`` and ``rng`` are templates (the freshly initialised values, laid out as
    the restored arrays should be: single-device, or global sharded arrays). Given
    ``config``, a checkpoint trained with other model-defining values is a
    `CheckpointError` naming them (`check_same_model`); one whose arrays do not match
    the templates is one naming the array.

    A damaged step (unreadable, or failing its checksums): with ``fallback`` (the
    default for the ``writable`` training run) it is named in a warning and the next
    older step is tried; without, `DamagedCheckpoint` names it. ``writable``: the
    damaged steps are moved aside (`set_aside`) once a good one is found; readers
    change nothing. No good step at all: `CheckpointError`. A reader beside a
    training run whose steps were rotated away while it read them lists the steps
    again (up to ``retries`` times) and reads the newest.
    """
    quiet_failed_reads()
    fallback = writable if fallback is None else fallback
    target = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    expected = shapes(target)
    abstract = jax.tree_util.tree_map(  # numpy leaves come back as numpy
        lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(x), target)
    damaged, vanished = [], []
    for step in sorted(manager.all_steps(), reverse=True):
        path = step_path(manager, step)
        try:
            meta = read_meta(manager, step)
            saved = saved_shapes(manager, step)
            if config is not None:
                check_same_model(saved_config(meta), config, path)
            check_fits(expected, saved, path, _mismatch_hint(meta, config))
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # pylint: disable=broad-except
                raise DamagedCheckpoint(f"its arrays cannot be read ({first_line(e)})") from e
            check_shapes(target, restored.tree, path)
            verify(restored.tree, meta, path)
            bad = finite.nonfinite_arrays(restored.tree["state"])
            if bad:
                raise NonFiniteCheckpoint(f"its arrays {finite.describe(bad)} hold NaN/Inf "
                                          f"values")
        except DamagedCheckpoint as e:
            if not epath.Path(path).exists():  # a training run's keep policy removed it
                logging.info("Checkpoint %s was removed while it was read; trying the next.",
                             path)
                vanished.append(step)
                continue
            damaged.append((step, path, e))
            if not fallback:
                raise type(e)(f"checkpoint {path} {e.what}: {e}. {e.fix}") from None
            continue
        if damaged:
            logging.warning(
                "Checkpoint(s) %s damaged (%s)%s. Using the previous good checkpoint %s "
                "(step %d).", ", ".join(p for _, p, _ in damaged), first_line(damaged[0][2]),
                f"; they are moved to {UNREADABLE_DIR}" if writable else "", path, step)
            if writable:
                set_aside(manager, [s for s, _, _ in damaged])
        state = flax.serialization.from_state_dict(state, restored.tree["state"])
        logging.info("Restored checkpoint %s (step %d, checksums verified).", path, step)
        return state, restored.tree["rng"], restored.meta
    if vanished and not writable and retries > 0:  # a training run saved newer steps
        manager.reload()
        return restore_latest(manager, state, rng, config=config, writable=writable,
                              fallback=fallback, retries=retries - 1)
    if damaged:
        raise CheckpointError(
            f"no checkpoint in {manager.directory} is good: "
            + "; ".join(f"{p}: {first_line(e)}" for _, p, e in damaged)
            + ". Delete them to start afresh, or restore the files.")
    return None


def restore_for_reading(manager: ocp.CheckpointManager, state, rng, *,
                        config: ml_collections.ConfigDict, fallback: bool = False):
    """`restore_latest` for eval / predict / analyze: read-only, never ``None``."""
    restored = restore_latest(manager, state, rng, config=config, fallback=fallback)
    if restored is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}: train first "
                              f"(--mode=train) or point --workdir at a trained run.")
    return restored


def _mismatch_hint(meta: dict, config) -> str:
    if config is None:
        return ""
    changed = config_differences(saved_config(meta), config)
    return f" (it was written with {'; '.join(changed[:5])})" if changed else ""


def read(manager: ocp.CheckpointManager, step: int, *, tree: bool = True,
         verify_checksums: bool = True) -> tuple[dict, dict]:
    """``(tree, meta)`` of a checkpoint as saved (nested dicts of numpy arrays), no template.

    ``tree=False`` reads only ``meta`` (``tree`` is then ``None``). The arrays are
    checked against their saved checksums (`DamagedCheckpoint`) unless told not to.
    """
    quiet_failed_reads()
    meta = read_meta(manager, step)
    if not tree:
        return None, meta
    metadata = manager.item_metadata(step)["tree"]
    if metadata is None:
        raise DamagedCheckpoint(f"checkpoint {step_path(manager, step)}: its array data "
                                f"(tree/) is missing")
    template = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), metadata.tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        tree=ocp.args.StandardRestore(template)))
    if verify_checksums:
        verify(restored.tree, meta, step_path(manager, step))
    return restored.tree, meta


def saved_config(meta: dict) -> dict:
    """The config (as a dict) a checkpoint's run was started with."""
    return json.loads(meta["config"])
