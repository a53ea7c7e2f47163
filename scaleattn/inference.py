"""Inference: a trained state and images in, class probabilities and attention out.

* `forward` / `Predictor`: normalised images ``[B, H, W, 3]`` -> class
  probabilities, the predicted mask and the attention weights, all at ``H x W``.
* `ms_flip_probs` / `evaluate_ms_flip`: the usual multi-scale + flip inference. The
  whole model (itself multi-scale: its attention merges ``model.scales``) is run on
  the input rescaled by each of ``predict.ms_scales`` (default 0.5 ... 1.75) and on
  its mirror image; the softmax probabilities, resized to the input size, are
  averaged.
* `restore_trained`: the model and the state of a trained run's latest checkpoint.

Imports no training code (the loop, the steps, the optimiser's use): the tools
(predict, analyze, crf_search) and the end of training both build on it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from scaleattn import checkpoint, crf, metrics
from scaleattn import state as state_lib
from scaleattn.models import build_model, layers
from scaleattn.state import variables_of


class NonFiniteScores(RuntimeError):
    """The network gave NaN/Inf scores: no metric or picture is made from them."""


def check_finite_probs(probs, where: str) -> None:
    """`NonFiniteScores` naming ``where`` if ``probs`` holds a NaN or an Inf."""
    bad = int(np.sum(~np.isfinite(np.asarray(probs))))
    if bad:
        raise NonFiniteScores(f"the network's scores hold {bad} NaN/Inf values on {where}: "
                              f"nothing is reported (the parameters overflow; retrain with a "
                              f"lower optim.base_lr)")


# --------------------------------------------------------------------- forward ---


def forward(variables: dict, images: jnp.ndarray, *, model) -> dict:
    """Inference at the input size.

    Args:
      variables: ``{'params', 'batch_stats'}``.
      images: ``float32 [B, H, W, 3]`` normalised.
    Returns:
      ``probs float32 [B, H, W, C]`` (softmax of the merged logits, bilinearly
      upsampled), ``prediction int32 [B, H, W]`` and, for attention / average merges,
      ``attention float32 [B, H, W, S]`` (the per-pixel weights over ``model.scales``,
      upsampled the same way).
    """
    out = model.apply(variables, images, train=False)
    size = images.shape[1:3]
    probs = jax.nn.softmax(layers.resize_bilinear(out["logits"].astype(jnp.float32), size))
    result = {"probs": probs, "prediction": jnp.argmax(probs, -1).astype(jnp.int32)}
    if "attention" in out:
        result["attention"] = layers.resize_bilinear(out["attention"].astype(jnp.float32),
                                                     size)
    return result


class Predictor:
    """``predictor(state, images) -> dict of numpy arrays``: jitted `forward` of a model."""

    def __init__(self, model):
        self.model = model
        self._forward = jax.jit(functools.partial(forward, model=model))

    def __call__(self, state, images: np.ndarray) -> dict:
        return jax.device_get(self._forward(variables_of(state), jnp.asarray(images)))


@functools.partial(jax.jit, static_argnames=("model", "scale", "flip"))
def scale_probs(variables: dict, images: jnp.ndarray, *, model, scale: float,
                flip: bool) -> jnp.ndarray:
    """Sum of the softmax of the model on ``images`` rescaled by ``scale`` (and, with
    ``flip``, on their mirror images, flipped back): ``[B, H, W, C]`` at the input size."""
    size = images.shape[1:3]
    x = images if scale == 1.0 else layers.resize_bilinear(
        images, layers.scaled_size(size, scale))
    if flip:
        x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
    logits = model.apply(variables, x, train=False)["logits"].astype(jnp.float32)
    probs = jax.nn.softmax(layers.resize_bilinear(logits, size))
    if flip:
        half = images.shape[0]
        probs = probs[:half] + probs[half:, :, ::-1]
    return probs


def ms_flip_probs(state, images: np.ndarray, *, model, scales, flip: bool) -> jnp.ndarray:
    """``[B, H, W, C]`` class probabilities averaged over ``scales`` (x2 with ``flip``)."""
    variables = variables_of(state)
    total = sum(scale_probs(variables, jnp.asarray(images), model=model, scale=float(s),
                            flip=bool(flip)) for s in scales)
    return total / (len(scales) * (2 if flip else 1))


def evaluate_ms_flip(config, model, state) -> dict:
    """mIoU etc. (`metrics.scores`) of multi-scale + flip inference over the eval split.

    ``state`` is a host (unreplicated) `TrainState`; each process evaluates its part
    of the split on its first device and the confusion matrices are summed. With
    ``eval.crf`` the averaged probabilities go through the dense CRF (`scaleattn.crf`)
    and ``'no_crf'`` holds the scores without it.
    """
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    batch_size = max(1, config.eval.batch_size // jax.process_count())
    crf_params = crf.CRFParams.from_config(config.crf) if config.eval.crf else None
    total = np.zeros((2,) * bool(crf_params) + (config.model.num_classes,) * 2, np.int64)
    for i, batch in enumerate(pipeline.eval_batches(config.data, batch_size=batch_size,
                                                    ignore_label=config.loss.ignore_label,
                                                    num_classes=config.model.num_classes)):
        if config.eval.max_batches and i >= config.eval.max_batches:
            break
        probs = ms_flip_probs(state, batch["image"], model=model,
                              scales=tuple(config.predict.ms_scales),
                              flip=config.predict.flip)
        check_finite_probs(probs, f"ms+flip eval batch {i}")
        predictions = [jnp.argmax(probs, -1)]
        if crf_params:
            predictions.append(jnp.argmax(crf.eval_batch_marginals(
                crf.log_probs_of(probs), batch["image"], batch["label"], crf_params,
                mean=tuple(config.data.mean), std=tuple(config.data.std),
                ignore_label=config.loss.ignore_label, fitted=True), -1))
        total += np.stack([np.asarray(metrics.confusion_matrix(
            p, jnp.asarray(batch["label"]), config.model.num_classes,
            config.loss.ignore_label)) for p in predictions]).reshape(total.shape)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
    scores = crf.scores_with_crf(total)
    logging.info("ms+flip eval (scales %s, flip %s): mIoU %.4f", tuple(config.predict.ms_scales),
                 config.predict.flip, scores["miou"])
    return scores




def restore_trained(config, workdir: str, *, fallback: bool = False):
    """``(model, host state, step)`` of the latest checkpoint in ``workdir``
    (a tuple: unpack it, ``model, state, step = restore_trained(...)``).

    Read-only. The checkpoint's saved config must define the same model as ``config``
    and its arrays must pass their checksums (`checkpoint.restore_latest`); a damaged
    newest step is an error, or with ``fallback`` the newest good step is used.
    """
    manager = checkpoint.open_for_reading(workdir)
    model = build_model(config.model)
    rng = jax.random.PRNGKey(config.seed)
    restored, _, meta = checkpoint.restore_for_reading(
        manager, state_lib.template(config, model, rng), rng, config=config, fallback=fallback)
    return model, restored, int(meta["step"])
