"""Label agreement of `scaleattn.crf` with pydensecrf2 on photos, for both normalisations.

    python -m benchmarks.crf_agreement PHOTO... [--classes=5] [--output=FILE.json]

For each photo (any RGB file PIL reads): scores like a stride-8 network's, with no
network: the photo's colours clustered into ``--classes`` groups (k-means, at 1/8
resolution) are the "true" classes, the logits ``3 x one-hot + N(0, 1)`` at 1/8
resolution, bilinearly upsampled, ``log_softmax``. DeepLab-LargeFOV's CRF parameters
(config defaults: 10 iterations, 4/121/5, 3/3). Reported per photo: the share of the
pixels whose label the CRF changes, and the share of pixels with the same label in

* ``jax_vs_pydensecrf``: this CRF and pydensecrf2 in the same normalisation ('row' =
  pydensecrf2's NORMALIZE_AFTER, the 2011 code's message; 'symmetric' = its default);
* ``row_vs_symmetric``: pydensecrf2 in one normalisation against the other (how much
  the choice of normalisation changes the labels).

Needs pydensecrf2 (``pip install -e .[crf]``, a C++ compiler).
"""

import argparse
import dataclasses
import json
import os

import jax
import numpy as np
from PIL import Image

from scaleattn import config as config_lib
from scaleattn import crf
from scaleattn.models import layers
from benchmarks.crf_bench import pydensecrf_marginals


def colour_classes(image: np.ndarray, classes: int, iterations: int = 10) -> np.ndarray:
    """``int [h, w]``: k-means clusters of the colours of ``image [h, w, 3]`` (centres
    start at evenly spaced quantiles of the brightness, so the result is deterministic)."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    order = np.argsort(pixels.sum(1))
    centres = pixels[order[((np.arange(classes) + 0.5) / classes * len(order)).astype(int)]]
    for _ in range(iterations):
        nearest = ((pixels[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([pixels[nearest == k].mean(0) if np.any(nearest == k) else centres[k]
                            for k in range(classes)])
    return nearest.reshape(image.shape[:2])


def photo_scores(image: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """``float32 [H, W, C]`` log-probabilities of a stride-8 'network' (module docstring)."""
    h, w = image.shape[:2]
    coarse = colour_classes(image[::8, ::8], classes)
    rng = np.random.default_rng(seed)
    logits = 3.0 * np.eye(classes, dtype=np.float32)[coarse] + rng.standard_normal(
        coarse.shape + (classes,), dtype=np.float32)
    logits = layers.resize_bilinear(logits[None], (h, w))[0]
    return np.asarray(jax.nn.log_softmax(logits))


def agreement(path: str, classes: int) -> dict:
    """One photo's row of the table (module docstring)."""
    with Image.open(path) as photo:
        image = np.array(photo.convert("RGB"))
    log_probs = photo_scores(image, classes)
    base = crf.CRFParams.from_config(config_lib.base_config().crf)
    valid = np.ones((1,) + image.shape[:2], bool)
    unary = log_probs.argmax(-1)
    row = {"photo": os.path.basename(path), "size": list(image.shape[:2])}
    reference = {}
    for normalization in ("row", "symmetric"):
        params = dataclasses.replace(base, normalization=normalization)
        ours = np.asarray(crf.dense_crf_fitted(log_probs[None], image[None].astype(np.float32),
                                               valid, params))[0].argmax(-1)
        theirs = pydensecrf_marginals(image, log_probs, params)
        if theirs is None:
            raise SystemExit("pydensecrf2 is not installed: pip install -e .[crf]")
        reference[normalization] = theirs.argmax(-1)
        row[normalization] = {
            "changed_by_crf": float(np.mean(reference[normalization] != unary)),
            "jax_vs_pydensecrf": float(np.mean(ours == reference[normalization]))}
    row["row_vs_symmetric"] = float(np.mean(reference["row"] == reference["symmetric"]))
    return row


COLUMNS = ["photo", "size", "labels the CRF changes (row / symmetric)",
           "same labels as pydensecrf2: row", "same labels as pydensecrf2: symmetric",
           "pydensecrf2: row vs symmetric"]


def table_row(row: dict) -> list[str]:
    """One photo's cells, in `COLUMNS` order."""
    def percent(x, digits=2):
        return f"{100 * x:.{digits}f} %"
    return [row["photo"], "x".join(str(n) for n in row["size"]),
            f"{percent(row['row']['changed_by_crf'], 1)} / "
            f"{percent(row['symmetric']['changed_by_crf'], 1)}",
            percent(row["row"]["jax_vs_pydensecrf"]),
            percent(row["symmetric"]["jax_vs_pydensecrf"]), percent(row["row_vs_symmetric"])]


def versions() -> dict:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    import platform  # pylint: disable=import-outside-toplevel
    return {"python": platform.python_version(),
            **{name: metadata.version(name) for name in ("jax", "jaxlib", "numpy", "pillow",
                                                          "pydensecrf2")}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--commit", default="unknown", help="recorded with the figures")
    parser.add_argument("--output", help="also write the result (benchmarks/results format)")
    args = parser.parse_args(argv)
    rows = []
    for path in args.photos:
        rows.append(agreement(path, args.classes))
        print(json.dumps(rows[-1]))
    result = {"command": "python -m benchmarks.crf_agreement " + " ".join(
                  os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p))
                  for p in args.photos) + f" --classes={args.classes}",
              "commit": args.commit, "versions": versions(), "constraints": None,
              "machine": f"CPU; DeepLab-LargeFOV's parameters, 10 iterations, "
                         f"{args.classes} colour classes",
              "columns": COLUMNS, "rows": [table_row(r) for r in rows], "photos": rows}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    return result


if __name__ == "__main__":
    main()
