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

    A finite loss and gradient norm mean the update of that step was finite too, so
    a checkpoint saved after a checked step holds finite parameters.
    """
    for key, name in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
        value = values.get(key, 0.0)
        if not np.isfinite(value):
            kept = ("no checkpoint was saved yet" if last_checkpoint is None else
                    f"the last good checkpoint (step {last_checkpoint}) is kept and a rerun "
                    f"resumes from it")
            raise NonFiniteLossError(
                f"{name} is {value} at step {step}: the run stopped; {kept}. Lower "
                f"optim.base_lr or check the data.")


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
               wall_time_s: float, start: str | None = None) -> dict | None:
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
                                params=host_state.params, start=start)
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


class Trainer:
    """One training run from its first (or resumed) step to its last.

    Built inside the workdir's lock with ``preemption`` already listening: checks the
    start, prepares the data, sets up the run, restores or initialises the state.
    `train` then loops over the steps.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 preemption: PreemptionFlag):
        self.config, self.workdir, self.preemption = config, workdir, preemption
        if not experiment.has_checkpoints(workdir):  # its start must exist before anything
            self.start = experiment.check_pretrained_start(config)
        else:
            self.start = config_lib.pretrained_file(config.model) or config_lib.INIT_SCRATCH
        experiment.prepare_data(config.data)
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
        if restored is not None:  # model.init_from is not read: the checkpoint has it all
            state, self.train_rng, meta = restored
            self.start_step = self.last_saved = int(meta["data_position"])
            logging.info("Resuming at step %d.", self.start_step)
        else:
            state = experiment.initial_state(run, init_rng)
            self.start_step, self.last_saved = 0, None
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
        """Checkpoints the state after ``step_done`` steps (once per step)."""
        if self.last_saved == step_done:
            return
        self.check_pending()
        checkpoint.save(self.manager, step_done, self.layout.saveable(self.device_state),
                        self.train_rng, self.config,
                        metrics=None if eval_scores is None else
                        {"miou": float(eval_scores["miou"])})
        self.last_saved = step_done

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
                                               start_step=self.start_step),
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
                    self.manager.wait_until_finished()
                    logging.warning("Preempted: saved step %d, exiting; rerun to resume.", done)
                    raise Preempted(done, self.preemption.signal_name)
            final = max(cfg.steps, self.start_step)
            self.check_pending()
            if cfg.eval_at_end and cfg.keep_best:  # evaluate first: rank the final state too
                scores = self.evaluate(final)
                self.save(final, scores)
            else:
                self.save(final)
            self.manager.wait_until_finished()
        except Preempted:
            self.writer.close()
            raise
        finally:  # an exception must not cut an asynchronous save short
            self.manager.wait_until_finished()
        logging.info("Training took %.1f s.", time.time() - run_start)
        if cfg.eval_at_end and not cfg.keep_best:
            scores = self.evaluate(cfg.steps)
        finish_run(self.run, self.workdir, self.device_state, scores, start=self.start,
                   wall_time_s=time.time() - run_start)
        if cfg.eval_at_end and "://" not in self.workdir:  # PNG files on a local disk
            self.pictures.save(self.layout.host(self.device_state),
                               os.path.join(self.workdir, summaries.PICTURES_DIR))
        self.writer.close()
        return scores
