"""``--mode=crf_search``: choose the CRF's appearance kernel on val images, as DeepLab did.

DeepLab fixed the smoothness kernel (``w2 = 3``, ``theta_gamma = 3``) and chose the
appearance kernel's weight and standard deviations (``w1``, ``theta_alpha``,
``theta_beta``) by the mIoU of the CRF's output on 100 val images. This runs that
search for a trained run:

1. the latest checkpoint of ``--workdir`` (read-only: nothing in the workdir changes)
   gives the merged scores of the first ``crf.search_images`` images of
   ``data.eval_split`` (single-scale eval inference), computed once;
2. every combination of ``crf.search_bilateral_weights`` x
   ``crf.search_bilateral_xy_stds`` x ``crf.search_bilateral_rgb_stds`` is applied
   with the config's ``crf.iterations``, ``crf.gaussian_weight`` and
   ``crf.gaussian_xy_std`` (and the config's own ``crf.*`` setting too, for
   comparison), and scored;
3. the table goes to the log; the best setting, its mIoU, the mIoU without the CRF
   and with the config's setting, every setting's mIoU and the ``--config`` flags
   that select the best go to a JSON file (``--output``, default
   ``WORKDIR/crf_search.json``; the one file this mode writes).

One process, one device. A lattice is sized once per image batch and
``(theta_alpha, theta_beta)`` and reused for every weight.
"""

import dataclasses
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from scaleattn import crf, experiment, inference, metrics, outputs
from scaleattn.models import layers
from scaleattn.state import variables_of

OUTPUT_NAME = "crf_search.json"


@dataclasses.dataclass
class ScoredBatch:
    """What the search keeps of one eval batch (host arrays)."""
    logits: np.ndarray      # float32 [b, h, w, C], the merged scores at the network's size
    image: np.ndarray       # float32 [b, S, S, 3], RGB 0..255
    valid: np.ndarray       # bool [b, S, S], the image inside the padded square
    label: np.ndarray       # int32 [b, S, S]


def grid(crf_config) -> list[crf.CRFParams]:
    """Every appearance-kernel setting of the search, the other parameters the config's."""
    base = crf.CRFParams.from_config(crf_config)
    return [dataclasses.replace(base, bilateral_weight=float(w), bilateral_xy_std=float(xy),
                                bilateral_rgb_std=float(rgb))
            for xy, rgb, w in itertools.product(crf_config.search_bilateral_xy_stds,
                                                crf_config.search_bilateral_rgb_stds,
                                                crf_config.search_bilateral_weights)]


def scored_batches(config, model, state, limit: int) -> list[ScoredBatch]:
    """The network's scores on the first ``limit`` images of the eval split."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    forward = jax.jit(lambda s, images: model.apply(variables_of(s), images,
                                                    train=False)["logits"])
    batches, seen = [], 0
    for batch in pipeline.eval_batches(config.data, batch_size=config.eval.batch_size,
                                       ignore_label=config.loss.ignore_label):
        keep = min(len(batch["image"]), limit - seen)
        image, label = batch["image"][:keep], batch["label"][:keep]
        valid = np.asarray(crf.padded_image_mask(image, label, config.loss.ignore_label))
        keep = min(keep, int(np.sum(valid.any((1, 2)))))  # filler examples end the split
        if keep == 0:
            break
        logits = np.asarray(forward(state, jnp.asarray(image[:keep])), np.float32)
        inference.check_finite_probs(logits, f"eval images {seen}..{seen + keep - 1}")
        batches.append(ScoredBatch(
            logits, np.asarray(crf.image_rgb(image[:keep], tuple(config.data.mean),
                                             tuple(config.data.std))),
            valid[:keep], label[:keep]))
        seen += keep
        if seen >= limit:
            break
    return batches


def _confusion(predictions, label, num_classes, ignore_label) -> np.ndarray:
    return np.asarray(metrics.confusion_matrix(predictions, jnp.asarray(label), num_classes,
                                               ignore_label), np.int64)


def _log_probs(logits: np.ndarray, size) -> jnp.ndarray:
    return jax.nn.log_softmax(layers.resize_bilinear(jnp.asarray(logits), size))


def search(config, workdir: str, output: str, *, fallback: bool = False) -> dict:
    """Runs the search (see the module docstring); returns the JSON record it writes."""
    output = outputs.check_file(output, "--output")
    experiment.prepare_data(config.data)
    model, state, step = inference.restore_trained(config, workdir, fallback=fallback)
    start = time.time()
    batches = scored_batches(config, model, state, config.crf.search_images)
    images = sum(len(b.logits) for b in batches)
    num_classes, ignore = config.model.num_classes, config.loss.ignore_label
    log_probs = jax.jit(_log_probs, static_argnums=1)
    size = batches[0].label.shape[1:3]
    plain = sum(_confusion(jnp.argmax(log_probs(b.logits, size), -1), b.label, num_classes,
                           ignore) for b in batches)
    settings = grid(config.crf)
    own = crf.CRFParams.from_config(config.crf)
    if own not in settings:
        settings.append(own)
    totals = {params: 0 for params in settings}
    for (xy_std, rgb_std), group in itertools.groupby(
            settings, key=lambda p: (p.bilateral_xy_std, p.bilateral_rgb_std)):
        group = list(group)
        for batch in batches:
            capacity = crf.fitted_capacity(crf.count_vertices(batch.image, batch.valid, group[0]))
            marginals = crf.dense_crf_weights(
                log_probs(batch.logits, size), batch.image, batch.valid, group[0],
                [p.bilateral_weight for p in group], capacity)
            for params, weight_marginals in zip(group, marginals):
                totals[params] = totals[params] + _confusion(
                    jnp.argmax(weight_marginals, -1), batch.label, num_classes, ignore)
        logging.info("theta_alpha %g, theta_beta %g: mIoU %s for w1 = %s", xy_std, rgb_std,
                     ", ".join(f"{metrics.scores(totals[p])['miou']:.4f}" for p in group),
                     ", ".join(f"{p.bilateral_weight:g}" for p in group))
    results = [dict(params.as_dict(), miou=metrics.scores(totals[params])["miou"])
               for params in settings]
    searched = results[:len(grid(config.crf))]
    best = max(searched, key=lambda r: r["miou"])
    record = {
        "workdir": workdir, "checkpoint_step": step, "split": config.data.eval_split,
        "images": images, "miou_no_crf": metrics.scores(plain)["miou"],
        "config_setting": results[settings.index(own)],
        "best": best,
        "flags": " ".join(f"--config.crf.{key}={best[key]:g}" for key in
                          ("bilateral_weight", "bilateral_xy_std", "bilateral_rgb_std")),
        "results": searched, "wall_time_s": round(time.time() - start, 1),
    }
    outputs.atomic_write(output, json.dumps(record, indent=1))
    logging.info("CRF search on %d %s images of step %d: without CRF mIoU %.4f; config's "
                 "setting %.4f; best %.4f with %s. Written to %s.", images,
                 config.data.eval_split, step, record["miou_no_crf"],
                 record["config_setting"]["miou"], best["miou"], record["flags"], output)
    return record


def default_output(workdir: str) -> str:
    """Where the search writes without ``--output``."""
    return os.path.join(workdir, OUTPUT_NAME)
