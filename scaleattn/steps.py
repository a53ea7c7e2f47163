"""The pure training and evaluation steps.

`train_step` and `eval_step` are functions of ``(state, batch, ...)`` with no side
effects; `parallel.Layout.compile_step` compiles them for one device (jit), all
local devices (pmap) or a device mesh (sharded jit). They combine values over
replicas only through the `parallel.Replicas` they are given, so the same code runs
in every mode. TensorFlow is not imported here: the steps run without it.

Mixed precision: ``model.dtype='bfloat16'`` computes in bf16 while the parameters,
gradients, optimiser state and batch-norm statistics stay float32 (Flax's
``param_dtype``), and losses are computed from float32 logits.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from scaleattn import crf, losses, metrics, optim, parallel
from scaleattn.models import layers
from scaleattn.state import TrainState, variables_of


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model,
               loss_config: ml_collections.ConfigDict, learning_rate,
               grad_accum_steps: int = 1, freeze_batch_norm: bool = False,
               replicas: parallel.Replicas = parallel.SINGLE,
               augment=None) -> tuple[TrainState, dict]:
    """One SGD step on ``batch`` (``image [b,H,W,3]``, ``label [b,H,W]``).

    A batch on the canvas (``data.augment_on='device'``: ``image uint8 [b,S,S,3]``,
    ``label uint8 [b,S,S]``, ``size int32 [b,2]``) is first turned into crops by
    ``augment(batch, rng, state.step, replicas)`` (`augment.from_config`; the crops
    depend on the run's key, the step and each example's index in the global batch,
    not on the device split). A batch without ``size`` is already cropped (the host
    augmented it, or a synthetic batch) and goes to the model as it is.

    Every replica computes the gradient of its share of the global loss (the loss
    normalises by the pixel count of the whole batch, `losses.global_count`); the
    shares are summed, so the update equals the one of a single device holding the
    whole batch. ``rng`` is the run's base key: dropout uses it folded with the step
    (and made distinct per replica).

    ``grad_accum_steps = k > 1`` runs ``k`` micro-batches of ``b / k`` one after the
    other (`accumulate_gradients`) and makes one update from the summed gradient:
    the same update as the whole batch at once (exactly, up to float rounding, for
    plain cross-entropy and frozen batch norm), in about ``1/k`` of the activation
    memory.

    ``freeze_batch_norm`` (``bn_mode == 'frozen'``): no gradient flows to the
    batch-norm parameters (`optim.stop_frozen_gradients`), which the optimiser does not
    update; ``grad_norm`` is the norm of the gradient of the parameters that train.
    """
    if "size" in batch:
        if augment is None:
            raise ValueError("the batch is on the canvas (data.augment_on='device') but the "
                             "train step has no augment function (augment.from_config)")
        batch = augment(batch, rng, state.step, replicas)
    step_rng = replicas.fold_in(jax.random.fold_in(rng, state.step))

    def loss_fn(params, micro_batch, dropout_rng, weights):
        if freeze_batch_norm:
            params = optim.stop_frozen_gradients(params)
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, micro_batch["image"],
            train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
        loss, terms = losses.segmentation_loss(outputs, micro_batch["label"], loss_config,
                                               replicas)
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
            loss_config=loss_config, replicas=replicas)
    grads, loss, terms = replicas.sum((grads, loss, terms))
    batch_stats = replicas.mean(batch_stats)
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
                 replicas: parallel.Replicas = parallel.SINGLE) -> jnp.ndarray:
    """Each micro-batch's share ``[k]`` of the valid pixels a loss term counts.

    ``labels [k, b, H, W]`` are matched to the term's logits size ``[b, h, w, C]`` as
    the loss does (`losses.match_sizes`). A term normalised by its micro-batch's own
    count, times this share, is the sum over that micro-batch divided by the count
    of the whole (global) batch, so the micro-batch terms add up to the big batch's.
    With OHEM the kept pixels are the same as in the big batch (``min_kept`` counts
    each image) but their count is known only after the forward pass; the valid-pixel
    share then approximates the kept-pixel share.
    """
    dummy = jnp.zeros(tuple(logits_shape[:3]) + (1,), jnp.float32)

    def count(micro_labels):
        _, matched = losses.match_sizes(dummy, micro_labels, loss_config.label_resize)
        return jnp.sum(matched != loss_config.ignore_label, dtype=jnp.float32)

    counts = replicas.sum(jax.vmap(count)(labels))
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def accumulate_gradients(grad_fn, state: TrainState, batch: dict, rng: jax.Array, k: int, *,
                         model, loss_config, replicas: parallel.Replicas = parallel.SINGLE):
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
    weights = {name: term_weights(micro["label"], logits[name].shape, loss_config, replicas)
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


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int,
              ignore_label: int = 255, replicas: parallel.Replicas = parallel.SINGLE,
              crf_params: crf.CRFParams | None = None, data_config=None
              ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``([C, C] confusion matrix, number of NaN/Inf scores)`` of one batch, both summed
    over replicas (a metric of non-finite scores would be meaningless: the caller
    refuses it).

    The merged logits are upsampled (bilinear) to the label size before the argmax,
    so the metric is computed at full resolution. With ``crf_params``, ``[2, C, C]``:
    without and with the dense CRF on those scores (`crf.eval_batch_marginals`; the
    RGB comes from ``data_config.mean`` / ``std``).
    """
    logits = model.apply(variables_of(state), batch["image"], train=False)["logits"]
    nonfinite = jnp.sum(~jnp.isfinite(logits.astype(jnp.float32)), dtype=jnp.int32)
    logits = layers.resize_bilinear(logits.astype(jnp.float32), batch["label"].shape[1:3])
    predictions = [jnp.argmax(logits, -1)]
    if crf_params is not None:
        marginals = crf.eval_batch_marginals(
            jax.nn.log_softmax(logits), batch["image"], batch["label"], crf_params,
            mean=tuple(data_config.mean), std=tuple(data_config.std), ignore_label=ignore_label)
        predictions.append(jnp.argmax(marginals, -1))
    confusion = jnp.stack([metrics.confusion_matrix(p, batch["label"], num_classes, ignore_label)
                           for p in predictions])
    return replicas.sum((confusion[0] if crf_params is None else confusion, nonfinite))
