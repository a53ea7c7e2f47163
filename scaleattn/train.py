"""Training and evaluation: the pure steps and the loop around them.

`train_step` and `eval_step` are pure functions of (state, batch, rng); `parallel`
compiles them for one device (`jit`), all local devices (`pmap`) or a device mesh
(`sharded`). The loop feeds them from the tf.data pipeline (each process its own
part of the global batch), logs (process 0), evaluates, checkpoints (every process)
and resumes; SIGTERM makes it save at the next step boundary and exit, a NaN/Inf
loss stops it naming the step. TensorFlow is imported only when data is read
(`scaleattn.data`), so the steps run without it.

Mixed precision: ``model.dtype='bfloat16'`` computes in bf16 while the parameters,
gradients, optimiser state and batch-norm statistics stay float32 (Flax's
``param_dtype``), and losses are computed from float32 logits.
"""

import collections
import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from scaleattn import checkpoint, crf, losses, metrics, optim, parallel, report, viz
from scaleattn import config as config_lib
from scaleattn.models import build_model, layers


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and step, plus batch-norm statistics."""
    batch_stats: Any = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class Preempted(Exception):
    """The run stopped early on a signal, after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signal_name: str | None):
        super().__init__(f"stopped by {signal_name or 'a preemption notice'} after step "
                         f"{step}; checkpoint saved, rerun the same command to resume")
        self.step = step




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
               grad_accum_steps: int = 1,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One SGD step on ``batch`` (``image [b,H,W,3]``, ``label [b,H,W]``).

    Under pmap (``axis_name`` set) every device computes the gradient of its share
    of the global loss; the shares are summed, so the update equals the one of a
    single device holding the whole batch. Under sharded `jit` the batch is one
    global array and no collective is needed. ``rng`` is the run's base key: dropout
    uses it folded with the step (and the device index under pmap).

    ``grad_accum_steps = k > 1`` runs ``k`` micro-batches of ``b / k`` one after the
    other (`accumulate_gradients`) and makes one update from the summed gradient:
    the same update as the whole batch at once (exactly, up to float rounding, for
    plain cross-entropy and frozen batch norm), in about ``1/k`` of the activation
    memory.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params, micro_batch, dropout_rng, weights):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, micro_batch["image"],
            train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
        loss, terms = losses.segmentation_loss(outputs, micro_batch["label"], loss_config,
                                               axis_name)
        if weights is not None:  # a micro-batch: its share of the whole batch's terms
            terms = {k: v * weights[k] for k, v in terms.items()}
            loss = sum(terms.values())
        return loss, (terms, updates["batch_stats"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, (terms, batch_stats)), grads = grad_fn(state.params, batch, step_rng, None)
    else:
        loss, terms, batch_stats, grads = accumulate_gradients(
            grad_fn, state, batch, step_rng, grad_accum_steps, model=model,
            loss_config=loss_config, axis_name=axis_name)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss, terms = jax.lax.psum((loss, terms), axis_name)
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    step_metrics = {"loss": loss, "learning_rate": learning_rate(state.step),
                    "grad_norm": optax.tree.norm(grads), **terms}
    return new_state, step_metrics


def micro_batches(batch: dict, k: int) -> dict:
    """``[b, ...]`` -> ``[k, b / k, ...]``; micro-batch ``j`` holds rows ``j, j + k, ...``.

    Strided rather than contiguous, so that when ``b`` is split over devices (the
    sharded mode) every device holds its share of every micro-batch.
    """
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"the per-replica batch ({x.shape[0]}) must divide into "
                             f"train.grad_accum_steps={k} micro-batches")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


def term_weights(labels: jnp.ndarray, logits_shape: tuple, loss_config,
                 axis_name: str | None) -> jnp.ndarray:
    """Each micro-batch's share ``[k]`` of the valid pixels a loss term counts.

    ``labels [k, b, H, W]`` are matched to the term's logits size ``[b, h, w, C]`` as
    the loss does (`losses.match_sizes`). A term normalised by its micro-batch's own
    count, times this share, is the sum over that micro-batch divided by the count
    of the whole (global) batch, so the micro-batch terms add up to the big batch's.
    With OHEM the kept pixels depend on the predictions; the valid-pixel share is
    then an approximation (each micro-batch mines its own hard pixels, as each device
    does under pmap).
    """
    dummy = jnp.zeros(tuple(logits_shape[:3]) + (1,), jnp.float32)

    def count(micro_labels):
        _, matched = losses.match_sizes(dummy, micro_labels, loss_config.label_resize)
        return jnp.sum(matched != loss_config.ignore_label, dtype=jnp.float32)

    counts = jax.vmap(count)(labels)
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def accumulate_gradients(grad_fn, state: TrainState, batch: dict, rng: jax.Array, k: int, *,
                         model, loss_config, axis_name: str | None):
    """Loss, terms, batch stats and gradient of ``batch`` from ``k`` micro-batches in a scan.

    ``grad_fn(params, micro_batch, rng, weights)`` is the step's ``value_and_grad``.
    Micro-batch ``j`` uses dropout key ``fold_in(rng, j)``. Trained batch norm sees
    micro-batch statistics (as pmap without sync would); its running averages move
    by the mean of the ``k`` micro-batch updates. Returns
    ``(loss, terms, batch_stats, grads)`` like one pass over the whole batch.
    """
    micro = micro_batches(batch, k)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)

    def forward(params, images):
        return model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                           train=True, rngs={"dropout": rng}, mutable=["batch_stats"])[0]

    outputs = jax.eval_shape(forward, state.params, first["image"])
    names = jax.eval_shape(lambda o, l: losses.segmentation_loss(o, l, loss_config)[1],
                           outputs, first["label"]).keys()
    logits = losses.supervised_maps(outputs, loss_config)
    weights = {name: term_weights(micro["label"], logits[name].shape, loss_config, axis_name)
               for name in names}

    def body(carry, xs):
        grads_sum, loss_sum, terms_sum, stats_shift = carry
        micro_batch, index, micro_weights = xs
        (loss, (terms, stats)), grads = grad_fn(
            state.params, micro_batch, jax.random.fold_in(rng, index), micro_weights)
        add = functools.partial(jax.tree_util.tree_map, jnp.add)
        shift = jax.tree_util.tree_map(jnp.subtract, stats, state.batch_stats)
        return (add(grads_sum, grads), loss_sum + loss, add(terms_sum, terms),
                add(stats_shift, shift)), None

    zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
    init = (zeros(state.params), jnp.zeros((), jnp.float32),
            {name: jnp.zeros((), jnp.float32) for name in names}, zeros(state.batch_stats))
    (grads, loss, terms, stats_shift), _ = jax.lax.scan(
        body, init, (micro, jnp.arange(k), weights))
    batch_stats = jax.tree_util.tree_map(lambda s, d: s + d / k, state.batch_stats,
                                         stats_shift)
    return loss, terms, batch_stats, grads


def predict(state: TrainState, images: jnp.ndarray, model) -> dict:
    """Model outputs in inference mode (no dropout, running batch-norm statistics)."""
    return model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int,
              ignore_label: int = 255, axis_name: str | None = None,
              crf_params: crf.CRFParams | None = None, data_config=None) -> jnp.ndarray:
    """``[C, C]`` confusion matrix of one batch, summed over devices under pmap.

    The merged logits are upsampled (bilinear) to the label size before the argmax,
    so the metric is computed at full resolution. With ``crf_params``, ``[2, C, C]``:
    without and with the dense CRF on those scores (`crf.eval_batch_marginals`; the
    RGB comes from ``data_config.mean`` / ``std``).
    """
    logits = predict(state, batch["image"], model)["logits"]
    logits = layers.resize_bilinear(logits.astype(jnp.float32), batch["label"].shape[1:3])
    predictions = [jnp.argmax(logits, -1)]
    if crf_params is not None:
        marginals = crf.eval_batch_marginals(
            jax.nn.log_softmax(logits), batch["image"], batch["label"], crf_params,
            mean=tuple(data_config.mean), std=tuple(data_config.std), ignore_label=ignore_label)
        predictions.append(jnp.argmax(marginals, -1))
    confusion = jnp.stack([metrics.confusion_matrix(p, batch["label"], num_classes, ignore_label)
                           for p in predictions])
    confusion = confusion[0] if crf_params is None else confusion
    if axis_name is not None:
        confusion = jax.lax.psum(confusion, axis_name)
    return confusion


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What one training/eval run needs: the model, compiled steps, sizes, the layout."""
    config: ml_collections.ConfigDict
    mode: str
    model: Any
    local_batch: int
    train_step: Any
    eval_step: Any
    schedule: Any
    layout: parallel.Layout = None


def setup_run(config: ml_collections.ConfigDict) -> Run:
    """Builds the model and the layout and compiles the steps for the config."""
    try:
        layout = parallel.make_layout(config.parallel)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    accum = config.train.grad_accum_steps
    model = build_model(config.model, bn_axis_name=layout.axis_name)
    local_batch = per_process_batch(config.batch_size)
    _, schedule = optim.create_optimizer(config.optim, config.train.steps,
                                         bn_frozen=config.model.bn_mode == "frozen")
    step = layout.compile_step(
        functools.partial(train_step, model=model, loss_config=config.loss,
                          learning_rate=schedule, grad_accum_steps=accum))
    evaluate_step = layout.compile_step(
        functools.partial(eval_step, model=model, num_classes=config.model.num_classes,
                          ignore_label=config.loss.ignore_label,
                          crf_params=(crf.CRFParams.from_config(config.crf)
                                      if config.eval.crf else None),
                          data_config=config.data), donate_state=False)
    return Run(config, layout.mode, model, local_batch, step, evaluate_step, schedule, layout)


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


def initial_state(run: Run, rng: jax.Array, *, pretrained: bool = True) -> TrainState:
    """A fresh state; with ``pretrained``, the ImageNet backbone of
    ``model.init_from`` loaded into it (`with_pretrained`). Callers that restore a
    checkpoint into it pass ``pretrained=False``: the file is then not read at all."""
    size = run.config.data.crop_size
    state = create_train_state(run.config, run.model, rng, (1, size, size, 3))
    return with_pretrained(run, state) if pretrained else state


def with_pretrained(run: Run, state: TrainState) -> TrainState:
    """``state`` with the ImageNet backbone of ``model.init_from`` (heads stay fresh);
    ``state`` itself for ``init_from='scratch'``."""
    path = config_lib.pretrained_file(run.config.model)
    if path is None:
        return state
    from scaleattn import weights  # pylint: disable=import-outside-toplevel
    return weights.load_pretrained(state, run.config, path)


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` holds checkpoint steps to resume from (read-only check)."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    directory = epath.Path(checkpoint.checkpoint_dir(workdir))
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_pretrained_start(config: ml_collections.ConfigDict) -> str:
    """Where a fresh run of ``config`` starts: ``'scratch'`` or the converted file's path.

    Raises `weights.WeightsError` (one line: the key, the file expected and the
    command that writes it) when the file does not exist, so a run that was meant to
    start from ImageNet never trains from random weights by accident.
    """
    path = config_lib.pretrained_file(config.model)
    if path is None:
        return config_lib.INIT_SCRATCH
    if not os.path.isfile(path):
        from scaleattn import weights  # pylint: disable=import-outside-toplevel
        raise weights.WeightsError(
            f"config.model.init_from={config.model.init_from!r}: {path} does not exist. "
            f"Convert ImageNet weights for {config.model.backbone} first: "
            f"{config_lib.convert_command(config.model.backbone, path)} (or pass "
            f"--config.model.init_from=scratch to train from random weights)")
    return path


def run_layout(run: Run) -> parallel.Layout:
    """The run's layout (a `Run` built by hand may carry only its mode)."""
    return run.layout if run.layout is not None else parallel.as_layout(run.mode)


def evaluate(run: Run, state, split: str | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU of (device) ``state`` over a split.

    Each process reads its part of the split; the confusion matrix the step returns
    already sums over all devices of all processes (pmap ``psum``, or the global
    arrays of the sharded mode). With ``eval.crf`` the scores are those after the
    dense CRF, and ``'no_crf'`` holds the scores of the same pass without it.
    """
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    cfg = run.config
    layout = run_layout(run)
    eval_batch = per_process_batch(cfg.eval.batch_size)
    total = np.zeros((2,) * bool(cfg.eval.crf) + (cfg.model.num_classes,) * 2, np.int64)
    for i, batch in enumerate(pipeline.eval_batches(cfg.data, batch_size=eval_batch,
                                                    split=split)):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        confusion = run.eval_step(state, layout.put_batch(batch))
        total += np.asarray(layout.host(confusion))
    scores = crf.scores_with_crf(total)
    if cfg.eval.crf:
        logging.info("dense CRF: mIoU %.4f (%.4f without it)", scores["miou"],
                     scores["no_crf"]["miou"])
    return scores


class PreemptionFlag:
    """SIGTERM (what Cloud TPU preemption and SLURM send) and SIGINT (Ctrl-C) ask the
    loop to save at the next step boundary and stop (`Preempted`; `scaleattn.main` exits
    with `main.PREEMPTED_EXIT`). A second SIGINT stops the process at once, without
    saving: the callables in ``on_abort`` run (the workdir lock is released), then
    ``exit_now(128 + SIGINT)`` (`os._exit`: no exception is raised into whatever the
    main thread was doing, which could leave a lock of a library held and the process
    hanging at exit).

    One process: Python handlers set ``requested``. Several processes: JAX's
    preemption service (started by `jax.distributed`) catches SIGTERM on whichever
    process gets it and agrees with the others on one step at which all of them save
    (`reached`, called every step); no Python SIGTERM handler is installed then, as it
    would replace the service's, and SIGINT is turned into a SIGTERM to this process.
    The handlers only set flags and write to file descriptor 2 (the main thread may be
    inside a write to ``sys.stderr``, which a second write would break).
    """

    def __init__(self, manager=None, exit_now: Callable[[int], None] = os._exit):
        self.requested = False
        self.signal_name = None
        self.manager = manager
        self.on_abort = []
        self.exit_now = exit_now
        self._previous = {}
        self._interrupts = 0

    def __enter__(self):
        import threading  # pylint: disable=import-outside-toplevel
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
        if self._interrupts > 1:
            os.write(2, b"stopped: interrupted twice (SIGINT): stopped at once, without saving "
                        b"the steps since the last checkpoint\n")
            for cleanup in self.on_abort:
                try:
                    cleanup()
                except Exception:  # pylint: disable=broad-except  # exiting anyway
                    pass
            self.exit_now(128 + signal.SIGINT)
            return
        self.signal_name = self.signal_name or name
        again = " (press Ctrl-C again to stop at once, without saving)"
        os.write(2, f"{name} received: saving a checkpoint at the next step boundary, then "
                    f"stopping{again if signum == signal.SIGINT else ''}.\n".encode())
        if jax.process_count() > 1:  # the preemption service agrees on the step
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (every process calls this each step)."""
        if jax.process_count() > 1 and self.manager is not None:
            self.requested = self.requested or self.manager.reached_preemption(step)
        return self.requested

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


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


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


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


def saved_form(layout: parallel.Layout, device_state):
    """What is handed to Orbax: numpy copies (pmap / jit; process 0 writes) or, in the
    sharded mode, an on-device copy of the global arrays (each process writes its
    shards). The copy matters: the next step donates ``device_state``'s buffers
    while the asynchronous save may still be reading them."""
    if layout.mode != "sharded":
        return jax.device_get(layout.host(device_state))
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, device_state)
    return jax.device_put(device_state, shardings, may_alias=False)  # a copy, same layout


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for ``config.train.steps`` (resuming from ``workdir``), then evaluates.

    Holds the workdir's lock throughout (`runlock`: a second training run on the same
    workdir is `runlock.WorkdirLocked`). Checkpoints every ``train.checkpoint_every``
    steps (and at evals with ``train.keep_best``); on SIGTERM or SIGINT saves at the
    next step boundary and raises `Preempted` (a second SIGINT ends the process at
    once, see `PreemptionFlag`); on a NaN/Inf loss raises `NonFiniteLossError` (the checkpoints saved before
    that step are kept). Resumes from the newest checkpoint that passes its checks
    (damaged ones are named and moved aside). Returns the last evaluation's scores
    (``{}`` if none ran).
    """
    workdir = checkpoint.resolve_workdir(workdir)
    with PreemptionFlag() as preemption, hold_workdir(workdir) as lock:
        if lock is not None:
            preemption.on_abort.append(lock.release)
        return _train_and_evaluate(config, workdir, preemption)


def hold_workdir(workdir: str):
    """`runlock.hold` by process 0; every process learns whether it got the lock."""
    from scaleattn import runlock  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
        return runlock.hold(workdir)

    @contextlib.contextmanager
    def held():
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        lock, error = None, None
        if jax.process_index() == 0:
            lock = runlock.RunLock(workdir)
            try:
                lock.acquire()
            except runlock.WorkdirLocked as e:
                error = e
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if error is not None:
            raise error
        if not ok:
            raise runlock.WorkdirLocked(f"{workdir} is in use by another training run "
                                        f"(process 0 names it)")
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()
    return held()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        preemption: PreemptionFlag) -> dict:
    """`train_and_evaluate` inside the lock, ``preemption`` already listening."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    if not has_checkpoints(workdir):  # a fresh run: its start must exist before anything
        start = check_pretrained_start(config)
    else:
        start = config_lib.pretrained_file(config.model) or config_lib.INIT_SCRATCH
    prepare_data(config.data)
    run = setup_run(config)
    layout = run.layout
    check_batch_sizes(config, layout)
    cfg = config.train
    manager = checkpoint.make_manager(workdir, cfg.keep_checkpoints, keep_best=cfg.keep_best,
                                      async_save=cfg.async_checkpoints, training=True)
    preemption.manager = manager
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    train_rng = np.asarray(train_rng)  # a host value: saved by process 0, read by all
    state = initial_state(run, init_rng, pretrained=False)
    restored = checkpoint.restore_latest(manager, layout.restore_target(state), train_rng,
                                         config=config, writable=True)
    start_step = 0
    if restored is not None:  # model.init_from is not read: the checkpoint has it all
        state, train_rng, meta = restored
        start_step = int(meta["data_position"])
        logging.info("Resuming at step %d.", start_step)
    else:
        state = with_pretrained(run, state)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    logging.info("Model %s: %.2fM parameters, %d process(es), %d device(s), %s, global batch "
                 "%d%s.", config.name, num_params / 1e6, jax.process_count(),
                 jax.device_count(), layout.describe(), config.batch_size,
                 f" in {cfg.grad_accum_steps} micro-batches" if cfg.grad_accum_steps > 1 else "")

    batches = prefetch(pipeline.train_batches(config.data, batch_size=run.local_batch,
                                              seed=config.seed, start_step=start_step),
                       layout.put_batch, config.data.device_prefetch)
    device_state = layout.put_state(state)
    del state
    device_rng = layout.put_replicated(train_rng)
    writer = MetricWriter(workdir)
    scores, pending = {}, None
    last_saved = start_step if restored is not None else None
    window_start, window_steps, run_start = time.time(), 0, time.time()

    def save(step_done: int, eval_scores: dict | None = None) -> None:
        nonlocal last_saved
        if last_saved == step_done:
            return
        if pending is not None:
            check_finite(*pending_values(), last_saved)
        checkpoint.save(manager, step_done, saved_form(layout, device_state), train_rng, config,
                        metrics=None if eval_scores is None else
                        {"miou": float(eval_scores["miou"])})
        last_saved = step_done

    def pending_values() -> tuple[int, dict]:
        step_done, step_metrics = pending
        return step_done, read_scalars(layout, {k: step_metrics[k]
                                                for k in ("loss", "grad_norm")})

    def evaluate_now(step_done: int) -> dict:
        result = log_scores(evaluate(run, device_state), step_done, writer)
        # viz reads the state on process 0 only: hand it a copy every process can read.
        viz.write_eval_images(writer, step_done, run,
                              layout.host(device_state) if layout.mode == "sharded"
                              else device_state)
        return result

    try:
        for step in range(start_step, cfg.steps):
            batch = next(batches)
            device_state, step_metrics = run.train_step(device_state, batch, device_rng)
            if pending is not None:  # check the previous step while this one runs
                check_finite(*pending_values(), last_saved)
            done = step + 1
            pending = (done, step_metrics)
            window_steps += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                host = read_scalars(layout, step_metrics)
                check_finite(done, host, last_saved)
                elapsed = time.time() - window_start
                host["images_per_second"] = window_steps * config.batch_size / elapsed
                eta = (cfg.steps - done) * elapsed / window_steps
                logging.info("step %d/%d  loss %.4f  lr %.2e  %.1f img/s  ETA %s", done,
                             cfg.steps, host["loss"], host["learning_rate"],
                             host["images_per_second"], format_eta(eta))
                writer.scalars(done, host)
                window_start, window_steps = time.time(), 0
            eval_scores = None
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                check_finite(*pending_values(), last_saved)
                scores = eval_scores = evaluate_now(done)
            if done % cfg.checkpoint_every == 0 or (cfg.keep_best and eval_scores):
                save(done, eval_scores)
            if preemption.reached(done):
                save(done)
                manager.wait_until_finished()
                logging.warning("Preempted: saved step %d, exiting; rerun to resume.", done)
                raise Preempted(done, preemption.signal_name)
        final = max(cfg.steps, start_step)
        if pending is not None:
            check_finite(*pending_values(), last_saved)
        if cfg.eval_at_end and cfg.keep_best:  # evaluate first: rank the final state too
            scores = evaluate_now(final)
            save(final, scores)
        else:
            save(final)
        manager.wait_until_finished()
    except Preempted:
        writer.close()
        raise
    finally:  # an exception must not cut an asynchronous save short
        manager.wait_until_finished()
    logging.info("Training took %.1f s.", time.time() - run_start)
    if cfg.eval_at_end and not cfg.keep_best:
        scores = evaluate_now(cfg.steps)
    report.finish_run(config, workdir, run, device_state, scores, start=start,
                      wall_time_s=time.time() - run_start)
    writer.close()
    return scores


def log_scores(scores: dict, step: int, writer: MetricWriter) -> dict:
    logging.info("eval at step %d: mIoU %.4f  pixel accuracy %.4f", step, scores["miou"],
                 scores["pixel_accuracy"])
    logging.info("per-class IoU: %s", np.array2string(scores["per_class_iou"], precision=3))
    writer.scalars(step, {"eval/miou": scores["miou"],
                          "eval/pixel_accuracy": scores["pixel_accuracy"]})
    return scores


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        fallback: bool = False) -> dict:
    """Evaluates the latest checkpoint in ``workdir`` on ``config.data.eval_split``.

    Read-only: the workdir is not changed. A damaged newest step is a
    `checkpoint.CheckpointError`, or with ``fallback`` the newest good one is used.
    """
    manager = checkpoint.open_for_reading(workdir)
    prepare_data(config.data)
    run = setup_run(config)
    check_batch_sizes(config, run.layout, keys=("eval.batch_size",))
    rng = jax.random.PRNGKey(config.seed)
    state = initial_state(run, rng, pretrained=False)
    _, train_rng = jax.random.split(rng)
    state, _, meta = checkpoint.restore_for_reading(
        manager, run.layout.restore_target(state), np.asarray(train_rng), config=config,
        fallback=fallback)
    scores = evaluate(run, run.layout.put_state(state))
    logging.info("eval of step %d: mIoU %.4f  pixel accuracy %.4f", meta["step"],
                 scores["miou"], scores["pixel_accuracy"])
    logging.info("per-class IoU: %s", np.array2string(scores["per_class_iou"], precision=3))
    if config.predict.ms_eval_at_end:  # multi-scale + flip inference as well
        from scaleattn import predict  # pylint: disable=import-outside-toplevel
        scores["ms_flip"] = predict.evaluate_ms_flip(config, run.model, jax.device_get(state))
    return scores
