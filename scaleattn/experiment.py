"""One run of a config: the model, the device layout, the compiled steps, the first
state and evaluation over a split.

`setup_run` turns a config into a `Run`; the training loop (`scaleattn.loop`) and
``--mode=eval`` (`evaluate_checkpoint`) both start from one. The data modules (and
with them TensorFlow) are imported only when data is read.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from scaleattn import augment as augment_lib
from scaleattn import checkpoint, crf, inference, optim, parallel, pretrained, steps
from scaleattn import config as config_lib
from scaleattn import state as state_lib
from scaleattn.models import build_model


@dataclasses.dataclass
class Run:
    """What one training/eval run needs: the model, optimiser, compiled steps, layout."""
    config: ml_collections.ConfigDict
    layout: parallel.Layout
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    local_batch: int
    train_step: Any
    eval_step: Any


def setup_run(config: ml_collections.ConfigDict) -> Run:
    """Builds the model, the optimiser and the layout and compiles the steps."""
    try:
        layout = parallel.make_layout(config.parallel)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    check_grouped_convolutions(config, layout)
    model = build_model(config.model, bn_axis_name=layout.axis_name)
    bn_frozen = config.model.bn_mode == "frozen"
    tx, schedule = optim.create_optimizer(config.optim, config.train.steps, bn_frozen=bn_frozen)
    train_fn, eval_fn = step_functions(config, model, schedule)
    return Run(config, layout, model, tx, schedule, per_process_batch(config.batch_size),
               layout.compile_step(train_fn), layout.compile_step(eval_fn, donate_state=False))


def check_grouped_convolutions(config: ml_collections.ConfigDict,
                               layout: parallel.Layout) -> None:
    """Refuses ResNeXt (grouped 3x3 convolutions) on a mesh whose two axes are both larger
    than 1: there XLA (jax 0.10.2) computes the grouped kernels' gradients wrongly (off by
    1-9 % of the gradient norm; `tests/test_layout_independence.py` holds the four-line
    case), so training would be silently wrong. Meshes (N, 1) and (1, N) and pmap are
    exact."""
    if layout.mesh is None or not config.model.backbone.startswith("resnext"):
        return
    data, model = layout.mesh.shape["data"], layout.mesh.shape["model"]
    if data > 1 and model > 1:
        raise config_lib.ConfigError(
            f"parallel.mesh_shape={tuple(config.parallel.mesh_shape)} gives a {data}x{model} "
            f"mesh, on which XLA computes the gradients of model.backbone="
            f"{config.model.backbone!r}'s grouped convolutions wrongly; use "
            f"parallel.mesh_shape=(-1, 1) or parallel.mode='pmap'")


def step_functions(config: ml_collections.ConfigDict, model, schedule):
    """``(train_fn, eval_fn)``: `steps.train_step` and `steps.eval_step` bound to the
    config's model, loss, schedule, grad accumulation, device augmentation and CRF, not
    yet compiled (`parallel.Layout.compile_step` compiles them; ``--mode=preflight``
    compiles the same functions for a TPU topology)."""
    bn_frozen = config.model.bn_mode == "frozen"
    train_fn = functools.partial(
        steps.train_step, model=model, loss_config=config.loss, learning_rate=schedule,
        grad_accum_steps=config.train.grad_accum_steps, freeze_batch_norm=bn_frozen,
        augment=augment_lib.from_config(config))
    eval_fn = functools.partial(
        steps.eval_step, model=model, num_classes=config.model.num_classes,
        ignore_label=config.loss.ignore_label,
        crf_params=crf.CRFParams.from_config(config.crf) if config.eval.crf else None,
        data_config=config.data)
    return train_fn, eval_fn


def check_batch_sizes(config: ml_collections.ConfigDict, layout: parallel.Layout, *,
                      keys=("batch_size", "eval.batch_size")) -> None:
    """Raises `ConfigError` unless the global batches split evenly over the layout
    (and the train batch's per-shard part into ``train.grad_accum_steps``)."""
    shards = layout.num_batch_shards
    for key in keys:
        if config_lib.lookup(config, key) % shards:
            raise config_lib.ConfigError(
                f"config.{key}={config_lib.lookup(config, key)} must divide evenly over the "
                f"{shards} batch shards of {layout.describe()}")
    accum = config.train.grad_accum_steps
    if "batch_size" in keys and (config.batch_size // shards) % accum:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} over {shards} batch shard(s) does not "
            f"divide into config.train.grad_accum_steps={accum} micro-batches")


def per_process_batch(global_batch: int) -> int:
    """This process's share of the global batch (checked to divide evenly)."""
    if global_batch % jax.process_count():
        raise ValueError(f"batch_size={global_batch} must divide over "
                         f"{jax.process_count()} processes")
    return global_batch // jax.process_count()


# --------------------------------------------------------------------------- the state


def state_initializer(run: Run, rng: jax.Array):
    """``init() -> TrainState`` at the training crop size (see `state.initializer`)."""
    size = run.config.data.crop_size
    return state_lib.initializer(run.model, run.tx, rng, (1, size, size, 3))


def initial_state(run: Run, rng: jax.Array, *, pretrained_start: bool = True):
    """A fresh state, created where the layout keeps it (`parallel.Layout.init_state`:
    sharded, each device computes its own shards); with ``pretrained_start``, the
    ImageNet backbone of ``model.init_from`` merged into it (`with_pretrained`).
    Hand it to `parallel.Layout.put_state` before the first step."""
    state = run.layout.init_state(state_initializer(run, rng))
    return with_pretrained(run, state) if pretrained_start else state


def with_pretrained(run: Run, state):
    """``state`` with the ImageNet backbone of ``model.init_from`` (heads stay fresh);
    ``state`` itself for ``init_from='scratch'``."""
    path = config_lib.pretrained_file(run.config.model)
    if path is None:
        return state
    return pretrained.load_pretrained(state, run.config, path)


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` holds checkpoint steps to resume from (read-only check)."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    directory = epath.Path(checkpoint.checkpoint_dir(workdir))
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_pretrained_start(config: ml_collections.ConfigDict) -> str:
    """Where a fresh run of ``config`` starts: ``'scratch'`` or the converted file's path.

    Raises `pretrained.WeightsError` (one line: the key, the file expected and the
    command that writes it) when the file does not exist, so a run that was meant to
    start from ImageNet never trains from random weights by accident.
    """
    path = config_lib.pretrained_file(config.model)
    if path is None:
        return config_lib.INIT_SCRATCH
    if not os.path.isfile(path):
        raise pretrained.WeightsError(
            f"config.model.init_from={config.model.init_from!r}: {path} does not exist. "
            f"Convert ImageNet weights for {config.model.backbone} first: "
            f"{config_lib.convert_command(config.model.backbone, path)} (or pass "
            f"--config.model.init_from=scratch to train from random weights)")
    return path


# --------------------------------------------------------------------------- evaluation


def prepare_data(data_config) -> None:
    """Builds / checks the dataset: process 0 first, then the others.

    The demo dataset is generated on first use; on a shared disk the other
    processes then find it built, on local disks each builds its own copy.
    """
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
        pipeline.ensure_prepared(data_config)
    checkpoint.sync_processes("scaleattn_data_prepared")
    if jax.process_index() != 0:
        pipeline.ensure_prepared(data_config)


def check_data_fits(config: ml_collections.ConfigDict) -> None:
    """Before training, what would otherwise fail after it: the eval split exists and
    its images fit ``data.eval_size`` (and the train images the canvas of device
    augmentation); `data.pipeline.check_sizes`."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    try:
        pipeline.check_sizes(config.data)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def evaluate(run: Run, state, split: str | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU of (device) ``state`` over a split.

    Each process reads its part of the split; the confusion matrix the step returns
    already sums over all devices of all processes (pmap ``psum``, or the global
    arrays of the sharded mode). With ``eval.crf`` the scores are those after the
    dense CRF, and ``'no_crf'`` holds the scores of the same pass without it.
    """
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    cfg = run.config
    eval_batch = per_process_batch(cfg.eval.batch_size)
    total = np.zeros((2,) * bool(cfg.eval.crf) + (cfg.model.num_classes,) * 2, np.int64)
    for i, batch in enumerate(pipeline.eval_batches(cfg.data, batch_size=eval_batch,
                                                    ignore_label=cfg.loss.ignore_label,
                                                    num_classes=cfg.model.num_classes,
                                                    split=split)):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        confusion, nonfinite = run.layout.host(run.eval_step(state, run.layout.put_batch(batch)))
        if int(np.asarray(nonfinite)):
            raise inference.NonFiniteScores(
                f"the network's scores hold {int(np.asarray(nonfinite))} NaN/Inf values on "
                f"eval batch {i} of {split or cfg.data.eval_split}: no metric is reported "
                f"(the parameters overflow; retrain with a lower optim.base_lr)")
        total += np.asarray(confusion)
    scores = crf.scores_with_crf(total)
    if cfg.eval.crf:
        logging.info("dense CRF: mIoU %.4f (%.4f without it)", scores["miou"],
                     scores["no_crf"]["miou"])
    return scores


def log_scores(scores: dict, step: int, what: str = "eval at step") -> dict:
    """Logs mIoU, pixel accuracy and the per-class IoU; returns ``scores``."""
    logging.info("%s %d: mIoU %.4f  pixel accuracy %.4f", what, step, scores["miou"],
                 scores["pixel_accuracy"])
    logging.info("per-class IoU: %s", np.array2string(scores["per_class_iou"], precision=3))
    return scores


def scores_record(scores) -> dict:
    """``scores`` (`evaluate`'s dict, nested, with NumPy values) as plain JSON values."""
    if isinstance(scores, dict):
        return {key: scores_record(value) for key, value in scores.items()}
    if isinstance(scores, (np.ndarray, np.generic)):
        return scores.tolist()
    return scores


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        fallback: bool = False) -> dict:
    """``--mode=eval``: the latest checkpoint in ``workdir`` on ``data.eval_split``
    (and multi-scale + flip with ``predict.ms_eval_at_end``).

    Read-only: the workdir is not changed. A damaged newest step is a
    `checkpoint.CheckpointError`, or with ``fallback`` the newest good one is used.
    """
    manager = checkpoint.open_for_reading(workdir)
    prepare_data(config.data)
    run = setup_run(config)
    check_batch_sizes(config, run.layout, keys=("eval.batch_size",))
    rng = jax.random.PRNGKey(config.seed)
    _, train_rng = jax.random.split(rng)
    state, _, meta = checkpoint.restore_for_reading(
        manager, run.layout.abstract_state(state_initializer(run, rng)),
        np.asarray(train_rng), config=config, fallback=fallback)
    device_state = run.layout.put_state(state)
    scores = log_scores(evaluate(run, device_state), meta["step"], "eval of step")
    scores["step"] = int(meta["step"])
    if config.predict.ms_eval_at_end:  # multi-scale + flip inference as well
        scores["ms_flip"] = inference.evaluate_ms_flip(
            config, run.model, jax.device_get(run.layout.host(device_state)))
    return scores
