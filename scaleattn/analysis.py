"""Attention weight against object size (the paper's Fig. 5 observation).

``python -m scaleattn.main --mode=analyze --config=... --workdir=RUN [--output=DIR]``
(or ``python -m scaleattn.analysis`` with the same flags) runs the latest checkpoint
over the labelled eval split (`data.pipeline.eval_batches`) and, for every object,

* an object = one connected component (4-connectivity, `scipy.ndimage.label`) of
  the pixels of one class in the ground truth; background (0) and ignore (255) are
  not objects. Two touching objects of one class are one component; the ignore
  band the demo and VOC draw around objects keeps most of them apart;
* its area (pixels) and the mean attention weight of each scale over its pixels,
  the weights ``[h, w, S]`` upsampled (bilinear, as the logits are) to the label size,

writes ``objects.csv`` (one row per object), ``attention_vs_size.png`` (the weight of
every scale against log10 area: a dot per object and the mean per size bin) and
``summary.json`` (per-bin means and the Spearman rank correlation of each scale's
weight with area). The paper's observation is that small objects put more weight on
the larger-resolution input (scale 1) and large objects on the down-scaled ones.
"""

import csv
import json
import math
import os

import numpy as np
import scipy.ndimage
import scipy.stats
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from scaleattn import config as config_lib
from scaleattn.models import layers

BACKGROUND = 0
# One colour per scale in the plot (then repeats).
SCALE_COLOURS = ((214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14),
                 (148, 103, 189))


# ------------------------------------------------------------------- objects ---


def object_components(label: np.ndarray, *, ignore_label: int = config_lib.VOC_IGNORE_LABEL,
                      background: int = BACKGROUND) -> list[tuple[int, np.ndarray]]:
    """The objects of a ground-truth map: ``[(class id, bool mask [H, W]), ...]``,
    one per 4-connected component of each class, ordered by class then scan order."""
    objects = []
    for cls in np.unique(label):
        if cls in (ignore_label, background):
            continue
        components, count = scipy.ndimage.label(label == cls)
        objects += [(int(cls), components == i) for i in range(1, count + 1)]
    return objects


def resize_attention(attention: np.ndarray, size) -> np.ndarray:
    """``[h, w, S]`` -> ``[size[0], size[1], S]``, bilinear with align_corners (as
    `layers.resize_bilinear` upsamples the logits)."""
    mh = layers.interpolation_matrix(attention.shape[0], int(size[0]))
    mw = layers.interpolation_matrix(attention.shape[1], int(size[1]))
    return np.einsum("oh,pw,hws->ops", mh, mw, np.asarray(attention, np.float32))


def object_rows(label: np.ndarray, attention: np.ndarray, *, image: int = 0,
                ignore_label: int = config_lib.VOC_IGNORE_LABEL) -> list[dict]:
    """One row per object of ``label [H, W]``: image, object, class, area (pixels),
    ``weight_<s>`` = mean of ``attention [H, W, S]`` (or smaller: resized) over it."""
    if attention.shape[:2] != label.shape:
        attention = resize_attention(attention, label.shape)
    rows = []
    for index, (cls, mask) in enumerate(object_components(label, ignore_label=ignore_label)):
        weights = attention[mask].mean(0)
        row = {"image": image, "object": index, "class": cls, "area": int(mask.sum())}
        row.update({f"weight_{s}": float(w) for s, w in enumerate(weights)})
        rows.append(row)
    return rows


# ---------------------------------------------------------------- statistics ---


def log_bins(areas: np.ndarray, per_decade: int = 4) -> np.ndarray:
    """Bin edges in log10(area), ``per_decade`` per factor of 10, covering ``areas``."""
    low = math.floor(np.log10(max(1, areas.min())) * per_decade) / per_decade
    high = math.ceil(np.log10(max(1, areas.max())) * per_decade + 1e-9) / per_decade
    return np.arange(low, high + 0.5 / per_decade, 1 / per_decade)


def binned_means(areas: np.ndarray, weights: np.ndarray, edges: np.ndarray) -> list[dict]:
    """Mean ``weights [N, S]`` of the objects in each log10(area) bin (non-empty bins):
    ``[{'log10_area': centre, 'count': n, 'mean_weight': [S floats]}, ...]``."""
    logs = np.log10(np.maximum(areas, 1))
    which = np.clip(np.digitize(logs, edges) - 1, 0, len(edges) - 2)
    bins = []
    for b in range(len(edges) - 1):
        inside = which == b
        if inside.any():
            bins.append({"log10_area": float((edges[b] + edges[b + 1]) / 2),
                         "count": int(inside.sum()),
                         "mean_weight": [float(w) for w in weights[inside].mean(0)]})
    return bins


def summarize(rows: list[dict], scales) -> dict:
    """Counts, per-bin means and each scale's Spearman correlation with area."""
    areas = np.array([r["area"] for r in rows], np.float64)
    weights = np.array([[r[f"weight_{s}"] for s in range(len(scales))] for r in rows])
    summary = {"scales": list(scales), "objects": len(rows), "bins": [],
               "spearman_weight_vs_area": []}
    if len(rows) >= 2:
        summary["bins"] = binned_means(areas, weights, log_bins(areas))
        for s in range(len(scales)):
            rho = scipy.stats.spearmanr(areas, weights[:, s]).statistic
            summary["spearman_weight_vs_area"].append(
                None if np.isnan(rho) else float(rho))
    return summary


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["image"])
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------- plot ---


def plot_weight_vs_size(rows: list[dict], scales, path: str, *, title: str = "",
                        size=(760, 480)) -> None:
    """A PNG chart: attention weight (y, 0..1) of each scale against object area (x, log
    scale); one faint dot per object and scale, a line through the per-bin means."""
    width, height = size
    left, right, top, bottom = 64, 150, 36, 55
    font = ImageFont.load_default()
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    areas = np.array([r["area"] for r in rows], np.float64)
    if len(rows) == 0:
        draw.text((left, top), "no objects", fill="black", font=font)
        canvas.save(path)
        return
    edges = log_bins(areas, per_decade=1)
    x0, x1 = float(edges[0]), float(max(edges[-1], edges[0] + 1))

    def px(log_area, weight):
        x = left + (log_area - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - weight * (height - top - bottom)
        return x, y

    # Axes, grid and ticks.
    for w in np.linspace(0, 1, 5):
        _, y = px(x0, w)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 36, y - 6), f"{w:.2f}", fill="black", font=font)
    for decade in range(int(math.floor(x0)), int(math.ceil(x1)) + 1):
        x, _ = px(decade, 0)
        draw.line([(x, top), (x, height - bottom)], fill=(225, 225, 225))
        draw.text((x - 12, height - bottom + 6), f"1e{decade}", fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left + (width - left - right) // 2 - 80, height - bottom + 24),
              "object area (pixels, log scale)", fill="black", font=font)
    y_label = "mean attention weight over the object"
    label_box = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, 14), "white")
    ImageDraw.Draw(label_box).text((2, 1), y_label, fill="black", font=font)
    label_box = label_box.rotate(90, expand=True)
    canvas.paste(label_box, (6, top + (height - top - bottom - label_box.height) // 2))
    if title:
        draw.text((left, 12), title, fill="black", font=font)

    # Dots (faint, drawn on an overlay) then the binned means.
    dots = Image.new("RGBA", size, (0, 0, 0, 0))
    dot_draw = ImageDraw.Draw(dots)
    logs = np.log10(np.maximum(areas, 1))
    for s in range(len(scales)):
        colour = SCALE_COLOURS[s % len(SCALE_COLOURS)]
        for la, r in zip(logs, rows):
            x, y = px(la, r[f"weight_{s}"])
            dot_draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour + (60,))
    canvas.paste(dots, (0, 0), dots)
    weights = np.array([[r[f"weight_{s}"] for s in range(len(scales))] for r in rows])
    bins = binned_means(areas, weights, log_bins(areas))
    for s, scale in enumerate(scales):
        colour = SCALE_COLOURS[s % len(SCALE_COLOURS)]
        points = [px(b["log10_area"], b["mean_weight"][s]) for b in bins]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline="black")
        ly = top + 10 + 18 * s
        draw.line([(width - right + 12, ly + 6), (width - right + 36, ly + 6)], fill=colour,
                  width=3)
        draw.text((width - right + 42, ly), f"scale {scale:g}", fill="black", font=font)
    draw.text((width - right + 12, top + 14 + 18 * len(scales)),
              "line: mean per bin", fill="black", font=font)
    canvas.save(path)


# ---------------------------------------------------------------------- run ---


def analyze(config, workdir: str, output_dir: str, *, fallback: bool = False) -> dict:
    """``--mode=analyze``: objects.csv, attention_vs_size.png, summary.json in
    ``output_dir`` for the latest checkpoint in ``workdir`` (read-only; ``fallback``:
    see `inference.restore_trained`); returns the summary."""
    from scaleattn import inference, outputs  # pylint: disable=import-outside-toplevel
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    scales = config_lib.inference_scales(config.model)
    if len(scales) < 2 or config.model.merge not in ("attention", "hierarchical"):
        raise config_lib.ConfigError(f"--mode=analyze needs an attention model over 2+ scales, got "
                         f"model.merge={config.model.merge!r}, model.scales={scales}")
    output_dir = outputs.check_dir(output_dir, "--output")
    pipeline.ensure_prepared(config.data)
    model, state, step = inference.restore_trained(config, workdir, fallback=fallback)
    predictor = inference.Predictor(model)
    rows, image = [], 0
    for i, batch in enumerate(pipeline.eval_batches(config.data,
                                                    batch_size=config.eval.batch_size,
                                                    ignore_label=config.loss.ignore_label,
                                                    process_index=0, process_count=1)):
        if config.eval.max_batches and i >= config.eval.max_batches:
            break
        predicted = predictor(state, batch["image"])
        inference.check_finite_probs(predicted["probs"], f"eval batch {i}")
        attention = predicted["attention"]
        for label, weights in zip(batch["label"], attention):
            if np.all(label == config.loss.ignore_label):  # filler slot
                continue
            rows += object_rows(label, weights, image=image,
                                ignore_label=config.loss.ignore_label)
            image += 1
    os.makedirs(output_dir, exist_ok=True)
    write_csv(rows, os.path.join(output_dir, "objects.csv"))
    summary = dict(summarize(rows, scales), config=config.name, step=step, images=image,
                   split=config.data.eval_split)
    plot_weight_vs_size(rows, scales, os.path.join(output_dir, "attention_vs_size.png"),
                        title=f"{config.name}, step {step}: {len(rows)} objects in "
                              f"{image} {config.data.eval_split} images")
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    logging.info("%d objects in %d images; Spearman(weight, area) per scale %s: %s",
                 len(rows), image, scales, summary["spearman_weight_vs_area"])
    for b in summary["bins"]:
        logging.info("area ~10^%.2f (%d objects): mean weights %s", b["log10_area"],
                     b["count"], np.round(b["mean_weight"], 3).tolist())
    return summary
