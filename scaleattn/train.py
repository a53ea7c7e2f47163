"""Training and evaluation: the pure steps and the loop around them.

`train_step` and `eval_step` are pure functions of (state, batch, rng); `parallel`
compiles them for one device (`jit`) or all local devices (`pmap`). The loop feeds
them from the tf.data pipeline, logs, evaluates, checkpoints and resumes. TensorFlow
is imported only when data is read (`scaleattn.data`), so the steps run without it.
"""

import dataclasses
import functools
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from scaleattn import checkpoint, losses, metrics, optim, parallel
from scaleattn.models import build_model, layers


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and step, plus batch-norm statistics."""
    batch_stats: Any = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- state


def create_train_state(config: ml_collections.ConfigDict, model, rng: jax.Array,
                       image_shape: tuple[int, ...]) -> TrainState:
    """Initialises the model on a dummy ``image_shape`` batch and builds the optimiser."""
    variables = jax.jit(functools.partial(model.init, train=False))(
        {"params": rng, "dropout": rng}, jnp.zeros(image_shape, jnp.float32))
    tx, _ = optim.create_optimizer(config.optim, config.train.steps,
                                   bn_frozen=config.model.bn_mode == "frozen")
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


# --------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model,
               loss_config: ml_collections.ConfigDict, learning_rate,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One SGD step on ``batch`` (``image [b,H,W,3]``, ``label [b,H,W]``).

    Under pmap (``axis_name`` set) every device computes the gradient of its share
    of the global loss; the shares are summed, so the update equals the one of a
    single device holding the whole batch. ``rng`` is the run's base key: dropout
    uses it folded with the step (and the device index under pmap).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": step_rng}, mutable=["batch_stats"])
        loss, terms = losses.segmentation_loss(outputs, batch["label"], loss_config, axis_name)
        return loss, (terms, updates["batch_stats"])

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss, terms = jax.lax.psum((loss, terms), axis_name)
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    step_metrics = {"loss": loss, "learning_rate": learning_rate(state.step),
                    "grad_norm": optax.tree.norm(grads), **terms}
    return new_state, step_metrics


def predict(state: TrainState, images: jnp.ndarray, model) -> dict:
    """Model outputs in inference mode (no dropout, running batch-norm statistics)."""
    return model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int,
              ignore_label: int = 255, axis_name: str | None = None) -> jnp.ndarray:
    """``[C, C]`` confusion matrix of one batch, summed over devices under pmap.

    The merged logits are upsampled (bilinear) to the label size before the argmax,
    so the metric is computed at full resolution.
    """
    logits = predict(state, batch["image"], model)["logits"]
    logits = layers.resize_bilinear(logits.astype(jnp.float32), batch["label"].shape[1:3])
    confusion = metrics.confusion_matrix(jnp.argmax(logits, -1), batch["label"], num_classes,
                                         ignore_label)
    if axis_name is not None:
        confusion = jax.lax.psum(confusion, axis_name)
    return confusion


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What one training/eval run needs: the model, compiled steps, sizes."""
    config: ml_collections.ConfigDict
    mode: str
    model: Any
    local_batch: int
    train_step: Any
    eval_step: Any
    schedule: Any


def setup_run(config: ml_collections.ConfigDict) -> Run:
    """Validates batch sizes against devices and compiles the steps for the config."""
    mode = config.parallel.mode
    axis = parallel.axis_name(mode)
    model = build_model(config.model, bn_axis_name=axis)
    local_batch = per_process_batch(config.batch_size)
    _, schedule = optim.create_optimizer(config.optim, config.train.steps,
                                         bn_frozen=config.model.bn_mode == "frozen")
    step = parallel.compile_step(
        functools.partial(train_step, model=model, loss_config=config.loss,
                          learning_rate=schedule), mode)
    evaluate_step = parallel.compile_step(
        functools.partial(eval_step, model=model, num_classes=config.model.num_classes,
                          ignore_label=config.loss.ignore_label), mode, donate_state=False)
    return Run(config, mode, model, local_batch, step, evaluate_step, schedule)


def per_process_batch(global_batch: int) -> int:
    """This process's share of the global batch (checked to divide evenly)."""
    if global_batch % jax.process_count():
        raise ValueError(f"batch_size={global_batch} must divide over "
                         f"{jax.process_count()} processes")
    return global_batch // jax.process_count()


def initial_state(run: Run, rng: jax.Array) -> TrainState:
    size = run.config.data.crop_size
    return create_train_state(run.config, run.model, rng, (1, size, size, 3))


def evaluate(run: Run, state, split: str | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU of (replicated) ``state`` over a split."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    cfg = run.config
    eval_batch = per_process_batch(cfg.eval.batch_size)
    total = np.zeros((cfg.model.num_classes,) * 2, np.int64)
    for i, batch in enumerate(pipeline.eval_batches(cfg.data, batch_size=eval_batch,
                                                    split=split)):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        confusion = run.eval_step(state, parallel.split_batch(batch, run.mode))
        total += np.asarray(parallel.unreplicate(confusion, run.mode))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
    return metrics.scores(total)


class PreemptionFlag:
    """Set by SIGTERM (what Cloud TPU preemption sends); the loop saves and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary.")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


class MetricWriter:
    """Scalars to the log and to TensorBoard (``workdir/tensorboard``), process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_finite(step: int, step_metrics: dict) -> None:
    loss = float(np.asarray(step_metrics["loss"]).reshape(-1)[0])
    if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss is {loss} at step {step}: the run stopped, the last checkpoint "
            f"(before this step) is kept. Lower optim.base_lr or check the data.")


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for ``config.train.steps`` (resuming from ``workdir``), then evaluates.

    Returns the last evaluation's scores (``{}`` if none ran).
    """
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.ensure_prepared(config.data)
    run = setup_run(config)
    cfg = config.train
    workdir = os.path.abspath(os.path.expanduser(workdir))
    manager = checkpoint.make_manager(workdir, cfg.keep_checkpoints)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    state = initial_state(run, init_rng)
    restored = checkpoint.restore_latest(manager, state, train_rng)
    start_step = 0
    if restored is not None:
        state, train_rng, meta = restored
        start_step = int(meta["data_position"])
        logging.info("Resuming at step %d.", start_step)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    logging.info("Model %s: %.2fM parameters, %d local device(s), mode %s, global batch %d.",
                 config.name, num_params / 1e6, jax.local_device_count(), run.mode,
                 config.batch_size)

    batches = pipeline.train_batches(config.data, batch_size=run.local_batch,
                                     seed=config.seed, start_step=start_step)
    device_state = parallel.replicate(state, run.mode)
    device_rng = parallel.replicated_rng(train_rng, run.mode)
    writer = MetricWriter(workdir)
    scores, pending = {}, None
    last_saved = start_step if restored is not None else None
    window_start, window_steps, run_start = time.time(), 0, time.time()

    def save(step_done: int) -> None:
        nonlocal last_saved
        if last_saved == step_done:
            return
        host_state = jax.device_get(parallel.unreplicate(device_state, run.mode))
        checkpoint.save(manager, step_done, host_state, train_rng, config)
        last_saved = step_done

    with PreemptionFlag() as preemption:
        for step in range(start_step, cfg.steps):
            batch = parallel.split_batch(next(batches), run.mode)
            device_state, step_metrics = run.train_step(device_state, batch, device_rng)
            if pending is not None:  # check the previous step while this one runs
                check_finite(*pending)
            pending = (step, step_metrics)
            done = step + 1
            window_steps += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                check_finite(*pending)
                host = {k: float(np.asarray(v).reshape(-1)[0])
                        for k, v in jax.device_get(step_metrics).items()}
                elapsed = time.time() - window_start
                host["images_per_second"] = window_steps * config.batch_size / elapsed
                eta = (cfg.steps - done) * elapsed / window_steps
                logging.info("step %d/%d  loss %.4f  lr %.2e  %.1f img/s  ETA %s", done,
                             cfg.steps, host["loss"], host["learning_rate"],
                             host["images_per_second"], format_eta(eta))
                writer.scalars(done, host)
                window_start, window_steps = time.time(), 0
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                scores = log_scores(evaluate(run, device_state), done, writer)
            if done % cfg.checkpoint_every == 0:
                check_finite(*pending)
                save(done)
            if preemption.requested:
                check_finite(*pending)
                save(done)
                manager.wait_until_finished()
                logging.warning("Preempted: saved step %d, exiting; rerun to resume.", done)
                writer.close()
                return scores
        if pending is not None:
            check_finite(*pending)
        save(max(cfg.steps, start_step))
        manager.wait_until_finished()
    logging.info("Training took %.1f s.", time.time() - run_start)
    if cfg.eval_at_end:
        scores = log_scores(evaluate(run, device_state), cfg.steps, writer)
    writer.close()
    return scores


def log_scores(scores: dict, step: int, writer: MetricWriter) -> dict:
    logging.info("eval at step %d: mIoU %.4f  pixel accuracy %.4f", step, scores["miou"],
                 scores["pixel_accuracy"])
    logging.info("per-class IoU: %s", np.array2string(scores["per_class_iou"], precision=3))
    writer.scalars(step, {"eval/miou": scores["miou"],
                          "eval/pixel_accuracy": scores["pixel_accuracy"]})
    return scores


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the latest checkpoint in ``workdir`` on ``config.data.eval_split``."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.ensure_prepared(config.data)
    run = setup_run(config)
    manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
    rng = jax.random.PRNGKey(config.seed)
    state = initial_state(run, rng)
    restored = checkpoint.restore_latest(manager, state, rng)
    if restored is None:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}: train first "
            f"(--mode=train) or point --workdir at a trained run.")
    state, _, meta = restored
    scores = evaluate(run, parallel.replicate(state, run.mode))
    logging.info("eval of step %d: mIoU %.4f  pixel accuracy %.4f", meta["step"],
                 scores["miou"], scores["pixel_accuracy"])
    logging.info("per-class IoU: %s", np.array2string(scores["per_class_iou"], precision=3))
    return scores
