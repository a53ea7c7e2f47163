"""The training loop: feed the compiled step, log, evaluate, checkpoint, resume, stop.

`train_and_evaluate` holds the workdir's lock (`runlock`), listens for preemption
(`preemption`), builds the run (`experiment.setup_run`), resumes from the newest good
checkpoint or starts fresh (from ImageNet weights unless the config says scratch),
then runs `Trainer`: every process feeds its part of the global batch from the
tf.data pipeline, process 0 logs, every process checkpoints. A NaN/Inf loss stops it
naming the step; SIGTERM / SIGINT make it save at the next step boundary and raise
`preemption.Preempted`. At the end it evaluates, writes ``run.json`` (`records`) and
the pictures of a few eval images (``eval_pictures/``, `summaries.EvalPictures`).
"""

import collections
import contextlib
import os
import time
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from scaleattn import checkpoint, experiment, inference, parallel, records, runlock, summaries
from scaleattn import config as config_lib
from scaleattn.preemption import Preempted, PreemptionFlag


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def check_finite(step: int, values: dict, last_checkpoint: int | None = None) -> None:
    """Raises `NonFiniteLossError` naming ``step`` (1-based) if its loss or gradient norm
    (``values['loss']``, ``values.get('grad_norm')``) is NaN or Inf.

    A finite loss and gradient norm do not make the update finite (a huge learning
    rate overflows it): the state itself is checked when it is saved (`Trainer.save`).
    """
    for key, name in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
        value = values.get(key, 0.0)
        if not np.isfinite(value):
            raise NonFiniteLossError(
                f"{name} is {value} at step {step}: the run stopped; "
                f"{kept_checkpoint(last_checkpoint)}. Lower optim.base_lr or check the data.")


def kept_checkpoint(last_checkpoint: int | None) -> str:
    """What a stopped run leaves to resume from (every saved state is finite, `checkpoint.save`)."""
    if last_checkpoint is None:
        return "no checkpoint was saved yet"
    return (f"the last finite checkpoint (step {last_checkpoint}) is kept and a rerun "
            f"resumes from it")


def read_scalars(layout: parallel.Layout, step_metrics: dict) -> dict:
    """``{name: float}`` of a step's metrics (waits for the step)."""
    return {k: float(np.asarray(v).reshape(-1)[0])
            for k, v in jax.device_get(layout.host(step_metrics)).items()}


def prefetch(batches: Iterator[dict], put: Callable[[dict], dict], size: int) -> Iterator[dict]:
    """Yields ``put(batch)`` for every batch, keeping ``size`` of them already put.

    ``put`` starts an asynchronous host-to-device copy (`parallel.Layout.put_batch`), so
    the batches of the next ``size`` steps travel while the current step computes. The
    order is unchanged; ``size <= 0`` puts each batch only when it is asked for.
    """
    queue = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > max(size, 0):
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def finish_run(run: experiment.Run, workdir: str, device_state, scores: dict, *,
               wall_time_s: float, start: str | None = None,
               resumed_at: int | None = None) -> dict | None:
    """End of training: multi-scale + flip eval if ``predict.ms_eval_at_end``, then
    ``run.json`` (`records.run_record`). Every process takes part in the evaluation;
    process 0 writes the file and gets the record (the others ``None``)."""
    config = run.config
    host_state = jax.device_get(run.layout.host(device_state))  # sharded: a collective
    ms_flip = None
    if config.predict.ms_eval_at_end:
        ms_flip = inference.evaluate_ms_flip(config, run.model, host_state)
    if jax.process_index() != 0:
        return None
    record = records.run_record(config, steps=int(host_state.step), scores=scores,
                                ms_flip_scores=ms_flip, wall_time_s=wall_time_s,
                                params=host_state.params, start=start,
                                resumed_at=resumed_at)
    records.write_run(workdir, record)
    return record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for ``config.train.steps`` (resuming from ``workdir``), then evaluates.

    Holds the workdir's lock throughout (a second training run on the same workdir is
    `runlock.WorkdirLocked`). Checkpoints every ``train.checkpoint_every`` steps (and
    at evals with ``train.keep_best``); on SIGTERM or SIGINT saves at the next step
    boundary and raises `Preempted` (a second SIGINT ends the process at once, see
    `PreemptionFlag`); on a NaN/Inf loss raises `NonFiniteLossError` (the checkpoints
    saved before that step are kept). Resumes from the newest checkpoint that passes
    its checks (damaged ones are named and moved aside). Returns the last
    evaluation's scores (``{}`` if none ran).
    """
    workdir = checkpoint.resolve_workdir(workdir)
    with PreemptionFlag() as preemption, runlock.hold_for_run(workdir) as lock:
        if lock is not None:
            preemption.on_abort.append(lock.release)
        return Trainer(config, workdir, preemption).train()


def resume_position(config: ml_collections.ConfigDict, meta: dict, workdir: str) -> int:
    """The training images read before the checkpoint ``meta`` describes (all processes).

    Refuses (`config.ConfigError`) a ``train.steps`` below the checkpoint's step. A run
    resumed with another ``batch_size`` continues at the same image, not the same
    batch (checkpoints of older versions, which stored no image position, must keep
    their batch size).
    """
    step = int(meta["step"])
    if config.train.steps < step:
        raise config_lib.ConfigError(
            f"config.train.steps={config.train.steps} is below the step of the checkpoint "
            f"in {workdir} (step {step}): that run has trained past it. Evaluate it with "
            f"--mode=eval, continue with --config.train.steps>={step}, or use another "
            f"--workdir for a {config.train.steps}-step run")
    saved_batch = meta.get("batch_size")
    if "data_position_images" not in meta:
        if saved_batch not in (None, config.batch_size):
            raise config_lib.ConfigError(
                f"config.batch_size={config.batch_size} differs from the checkpoint's "
                f"({saved_batch}), whose data position is in batches: resume with "
                f"--config.batch_size={saved_batch}")
        return step * config.batch_size
    images = int(meta["data_position_images"])
    if saved_batch is not None and saved_batch != config.batch_size:
        logging.warning("batch_size %d differs from the checkpoint's %d: the data continues "
                        "at image %d of the stream (not at batch %d).", config.batch_size,
                        saved_batch, images, step)
    return images


class Trainer:
    """One training run from its first (or resumed) step to its last.

    Built inside the workdir's lock with ``preemption`` already listening: checks the
    start, prepares the data, sets up the run, restores or initialises the state.
    `train` then loops over the steps.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 preemption: PreemptionFlag):
        self.config, self.workdir, self.preemption = config, workdir, preemption
        resuming = experiment.has_checkpoints(workdir)
        if not resuming:  # its start must exist before anything
            self.start = experiment.check_pretrained_start(config)
        experiment.prepare_data(config.data)
        experiment.check_data_fits(config)
        self.run = run = experiment.setup_run(config)
        self.layout = layout = run.layout
        experiment.check_batch_sizes(config, layout)
        cfg = config.train
        self.manager = checkpoint.make_manager(
            workdir, cfg.keep_checkpoints, keep_best=cfg.keep_best,
            async_save=cfg.async_checkpoints, training=True)
        preemption.manager = self.manager
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
        self.train_rng = np.asarray(train_rng)  # a host value: saved by process 0, read by all
        initializer = experiment.state_initializer(run, init_rng)
        restored = checkpoint.restore_latest(self.manager, layout.abstract_state(initializer),
                                             self.train_rng, config=config, writable=True)
        self.resumed_at = None
        if restored is not None:  # model.init_from is not read: the checkpoint has it all
            state, self.train_rng, meta = restored
            self.start_step = self.last_saved = self.resumed_at = int(meta["step"])
            self.start = meta.get("start")  # where the run's first step started from
            self.start_image = resume_position(config, meta, workdir)
            logging.info("Resuming at step %d.", self.start_step)
        else:
            state = experiment.initial_state(run, init_rng)
            self.start_step, self.last_saved, self.start_image = 0, None, 0
            if resuming:  # every step was set aside as damaged: a fresh start after all
                self.start = experiment.check_pretrained_start(config)
        num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        logging.info("Model %s: %.2fM parameters, %d process(es), %d device(s), %s, global "
                     "batch %d%s.", config.name, num_params / 1e6, jax.process_count(),
                     jax.device_count(), layout.describe(), config.batch_size,
                     f" in {cfg.grad_accum_steps} micro-batches"
                     if cfg.grad_accum_steps > 1 else "")
        self.device_state = layout.put_state(state)
        self.writer = summaries.MetricWriter(workdir)
        self.pictures = summaries.EvalPictures(self.writer, config, run.model)
        self.pending = None  # (step, metrics) of the last step, checked while the next runs

    # ------------------------------------------------------------------ pieces

    def check_pending(self) -> None:
        """Raises `NonFiniteLossError` if the last step run had a NaN/Inf loss."""
        if self.pending is not None:
            step_done, step_metrics = self.pending
            values = read_scalars(self.layout, {k: step_metrics[k]
                                                for k in ("loss", "grad_norm")})
            check_finite(step_done, values, self.last_saved)

    def save(self, step_done: int, eval_scores: dict | None = None) -> None:
        """Checkpoints the state after ``step_done`` steps (once per step).

        A state with NaN/Inf arrays is not saved: `NonFiniteLossError` names the step,
        the arrays and the last finite checkpoint. A write that fails (disk full, a
        file-size limit) is a `checkpoint.CheckpointError` naming the step and the
        checkpoint still intact.
        """
        if self.last_saved == step_done:
            return
        self.check_pending()
        try:
            checkpoint.save(self.manager, step_done, self.layout.saveable(self.device_state),
                            self.train_rng, self.config,
                            metrics=None if eval_scores is None else
                            {"miou": float(eval_scores["miou"])},
                            start=self.start, position_images=self.position_images(step_done))
        except checkpoint.NonFiniteState as e:
            raise NonFiniteLossError(
                f"{e} although the loss was finite (the update overflowed): it was not "
                f"saved and the run stopped; {kept_checkpoint(self.last_saved)}. Lower "
                f"optim.base_lr (now {self.config.optim.base_lr:g}) or check the data.") from None
        except checkpoint.CheckpointError:
            raise
        except Exception as e:  # pylint: disable=broad-except  # Orbax / TensorStore / OS
            raise checkpoint.write_error(self.manager, step_done, e) from None
        self.last_saved = step_done

    def position_images(self, step_done: int) -> int:
        """Training images the run has read after ``step_done`` steps (all processes)."""
        return self.start_image + (step_done - self.start_step) * self.config.batch_size

    def wait_for_saves(self) -> None:
        """Waits for the asynchronous saves; a failed one is a `checkpoint.CheckpointError`."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            raise checkpoint.write_error(self.manager, None, e) from None

    def evaluate(self, step_done: int) -> dict:
        """Scores on the eval split, logged, with pictures in TensorBoard."""
        scores = experiment.log_scores(experiment.evaluate(self.run, self.device_state),
                                       step_done)
        self.writer.scalars(step_done, {"eval/miou": scores["miou"],
                                        "eval/pixel_accuracy": scores["pixel_accuracy"]})
        # Every process takes part in reading the state back (a collective when sharded).
        self.pictures.write(step_done, self.layout.host(self.device_state))
        return scores

    def batches(self) -> Iterator[dict]:
        from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
        return prefetch(pipeline.train_batches(self.config.data,
                                               batch_size=self.run.local_batch,
                                               seed=self.config.seed,
                                               ignore_label=self.config.loss.ignore_label,
                                               num_classes=self.config.model.num_classes,
                                               start_step=self.start_step,
                                               start_example=self.start_image //
                                               jax.process_count()),
                        self.layout.put_batch, self.config.data.device_prefetch)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.config.train
        run_start = time.time()
        progress = summaries.Progress(cfg.steps, self.config.batch_size)
        device_rng = self.layout.put_replicated(self.train_rng)
        batches = self.batches()
        scores = {}
        try:
            for step in range(self.start_step, cfg.steps):
                self.device_state, step_metrics = self.run.train_step(
                    self.device_state, next(batches), device_rng)
                self.check_pending()  # the previous step, while this one runs
                done = step + 1
                self.pending = (done, step_metrics)
                progress.step()
                if done % cfg.log_every == 0 or done == cfg.steps:
                    scalars = read_scalars(self.layout, step_metrics)
                    check_finite(done, scalars, self.last_saved)
                    summaries.log_progress(self.writer, progress, done, scalars)
                eval_scores = None
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    self.check_pending()
                    scores = eval_scores = self.evaluate(done)
                if done % cfg.checkpoint_every == 0 or (cfg.keep_best and eval_scores):
                    self.save(done, eval_scores)
                if self.preemption.reached(done):
                    self.save(done)
                    self.wait_for_saves()
                    logging.warning("Preempted: saved step %d, exiting; rerun to resume.", done)
                    raise Preempted(done, self.preemption.signal_name)
            final = max(cfg.steps, self.start_step)
            self.check_pending()
            if cfg.eval_at_end and cfg.keep_best:  # evaluate first: rank the final state too
                scores = self.evaluate(final)
                self.save(final, scores)
            else:
                self.save(final)
            self.wait_for_saves()
        except Preempted:
            self.writer.close()
            raise
        finally:  # an exception must not cut an asynchronous save short
            with contextlib.suppress(Exception):  # a failed save was reported above
                self.manager.wait_until_finished()
        logging.info("Training took %.1f s.", time.time() - run_start)
        if cfg.eval_at_end and not cfg.keep_best:
            scores = self.evaluate(cfg.steps)
        finish_run(self.run, self.workdir, self.device_state, scores, start=self.start,
                   resumed_at=self.resumed_at, wall_time_s=time.time() - run_start)
        if cfg.eval_at_end and "://" not in self.workdir:  # PNG files on a local disk
            self.pictures.save(self.layout.host(self.device_state),
                               os.path.join(self.workdir, summaries.PICTURES_DIR))
        self.writer.close()
        return scores
