"""Time the dense CRF (`scaleattn.crf`) on one image, and pydensecrf2 if installed.

    python -m benchmarks.crf_bench [--size=513] [--classes=21] [--iterations=10]
        [--repeats=3] [--output=FILE.json]

The image is the synthetic VOC-like photo of `benchmarks.fake_voc` (smooth
multi-octave texture, 1-4 tinted objects); the scores are what a stride-8 network
gives: its true classes at 1/8 resolution plus unit Gaussian noise, bilinearly
upsampled, then ``log_softmax``. DeepLab-LargeFOV's CRF parameters (config
defaults). Timed, each after one untimed warm-up call (that compiles): the JAX CRF
with the lattice sized for any image (``H * W * 6`` vertices, what the eval step
uses) and sized to the image (`crf.dense_crf_fitted`: counting the vertices first,
then the CRF), on the default JAX device; pydensecrf2 (Krähenbühl's C++ code, one
CPU thread) where it can be imported. Prints one line per implementation; the labels
each gives are compared with the JAX ones.
"""

import argparse
import json
import statistics
import time

import jax
import numpy as np

from scaleattn import config as config_lib
from scaleattn import crf
from benchmarks import fake_voc
from scaleattn.models import layers


def scene(size: int, classes: int, seed: int = 0):
    """``(rgb uint8 [S, S, 3], truth int [S, S], log_probs float32 [S, S, C])``."""
    image = fake_voc.synthetic_image("crf_bench", size, size, seed=seed)
    truth = fake_voc.synthetic_masks("crf_bench", size, size, seed=seed, border=0)[1]
    truth = np.minimum(truth.astype(np.int64), classes - 1)
    coarse = truth[::8, ::8]
    rng = np.random.default_rng(seed)
    logits = 4.0 * np.eye(classes, dtype=np.float32)[coarse] + rng.standard_normal(
        coarse.shape + (classes,), dtype=np.float32)
    logits = layers.resize_bilinear(logits[None], (size, size))[0]
    return image, truth, np.asarray(jax.nn.log_softmax(logits))


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """``(first call s, median of ``repeats`` later calls s, last result)``."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result


def pydensecrf_marginals(image, log_probs, params: crf.CRFParams):
    """``[H, W, C]`` marginals from pydensecrf2 with ``params.normalization``, or ``None``
    if it is not installed."""
    try:
        from pydensecrf import densecrf  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    # The 2013 code's NORMALIZE_AFTER is the 2011 code's row normalisation: norm * K(Q).
    normalization = {"row": densecrf.NORMALIZE_AFTER,
                     "symmetric": densecrf.NORMALIZE_SYMMETRIC}[params.normalization]
    h, w, c = log_probs.shape
    model = densecrf.DenseCRF2D(w, h, c)
    model.setUnaryEnergy(np.ascontiguousarray(-log_probs.reshape(-1, c).T))
    model.addPairwiseGaussian(sxy=params.gaussian_xy_std, compat=params.gaussian_weight,
                              normalization=normalization)
    model.addPairwiseBilateral(sxy=params.bilateral_xy_std, srgb=params.bilateral_rgb_std,
                               rgbim=np.ascontiguousarray(image), compat=params.bilateral_weight,
                               normalization=normalization)
    return np.asarray(model.inference(params.iterations)).T.reshape(h, w, c)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    crf_config = config_lib.base_config().crf
    crf_config.unlock()
    crf_config.iterations = args.iterations
    params = crf.CRFParams.from_config(crf_config)
    image, truth, log_probs = scene(args.size, args.classes)
    batch = (log_probs[None], image[None].astype(np.float32),
             np.ones((1, args.size, args.size), bool))
    vertices = int(crf.count_vertices(batch[1], batch[2], params)[0])
    device = jax.devices()[0].device_kind
    rows = []

    def report(name, first, median, marginals):
        labels = np.asarray(marginals).reshape(truth.shape + (-1,)).argmax(-1)
        row = {"implementation": name, "device": device, "size": args.size,
               "classes": args.classes, "iterations": args.iterations,
               "first_call_s": round(first, 3), "median_s": round(median, 3),
               "pixel_accuracy": float((labels == truth).mean()),
               "same_labels_as_jax": (None if not rows else
                                      float((labels == rows[0]["labels"]).mean()))}
        rows.append(dict(row, labels=labels))
        print(json.dumps(row))

    report("jax, lattice for any image", *timed(lambda: crf.dense_crf(*batch, params),
                                                args.repeats))
    report(f"jax, lattice fitted ({vertices} vertices)",
           *timed(lambda: crf.dense_crf_fitted(*batch, params), args.repeats))
    first, median, marginals = timed(lambda: pydensecrf_marginals(image, log_probs, params),
                                     args.repeats)
    if marginals is not None:
        report("pydensecrf2 (C++, 1 thread)", first, median, marginals)
    print(json.dumps({"unary_only_pixel_accuracy":
                      float((log_probs.argmax(-1) == truth).mean())}))
    rows = [{k: v for k, v in row.items() if k != "labels"} for row in rows]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
