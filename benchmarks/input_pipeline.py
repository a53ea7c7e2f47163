"""How many images per second the tf.data input pipeline delivers on this host.

    python -m benchmarks.input_pipeline --crop=321,513 --batch=16 \\
        [--augment_on=host,device] [--breakdown] \\
        [--data_dir=~/tensorflow_datasets] [--num_images=200] [--seconds=20] \\
        [--repeats=2] [--workers=N] [--step_batch=30 --step_seconds=0.5] \\
        [--output=input_pipeline.json]

Data. If ``voc2012`` is prepared in ``--data_dir`` it is used (train split
``train_aug``, eval split ``val``). Otherwise (or with ``--synthetic``) a
VOC-shaped stand-in is made in a temporary folder: `benchmarks.fake_voc`
writes the two archives with ``--num_images`` train_aug and ``--num_val`` val
images (500x375 photo-like JPEGs, quality 90, palette PNG / SBD ``.mat`` masks),
the real `scaleattn.data.voc.Voc2012` builder builds them (md5 checks skipped),
and the folder is deleted at the end. The cost per image (decode, resize, pad,
crop, copy) depends mostly on the image size, little on what the image shows.

What is timed. The production iterators, unchanged: `pipeline.train_batches`
with ``data.augment_on='host'`` (decode, random scale 0.5-2, pad, random crop,
flip, normalise, batch; one ``--crop`` at a time) and with ``'device'`` (decode,
place on the uint8 canvas of ``--eval_size``, batch: the rescale, crop and flip
then run in the train step, `scaleattn.augment`, not on the host), and
`pipeline.eval_batches` (decode, normalise, pad to ``--eval_size``; restarted
after each pass; the all-ignore filler examples at the end of a pass are not
counted). ``--breakdown`` also times the host train pipeline cut after each
stage (records read; + decode; + random rescale), every cut batched the same way
but reduced to a few numbers per image, so the cost of each stage is the
difference of two cumulative costs (CPU seconds per image); the last stages are
the full host and device rows. For each, the iterator is first drained for
``--warmup`` seconds (shuffle buffer filled, tf.data autotuning settled), then
``--repeats`` windows of ``--seconds`` each are timed, batches converted to
numpy as the training loop receives them. Per window:

* images/s: images pulled / wall time, what this host delivered as it was;
* images per CPU-second: images / this process's CPU time (user + system, all
  threads): the cost of an image, which does not depend on how many cores the
  process actually got on a busy host; the busy cores a consumer needs are its
  images/s divided by this (``--step_seconds`` prints that);
* CPUs busy: CPU time / wall time, how many cores the process got;
* the 1-minute load average at the end of the window.

``--workers=N`` pins the process to N of its CPUs (``sched_setaffinity``) and
sizes TensorFlow's thread pools to N, so "images/s per N cores" can be measured
on a larger host. Results go to stdout as a table and, with ``--output``, to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Iterator

from scaleattn import config as config_lib
from scaleattn import outputs

IMAGE_SIZE = (500, 375)  # width, height of the synthetic images (the usual VOC size)


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def limit_workers(workers: int) -> list[int]:
    """Pins the process to ``workers`` of its CPUs and sizes TF's pools to match.

    Call before TensorFlow runs anything (its thread pools are made once).
    Returns the CPUs kept.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= workers <= len(cpus):
        raise ValueError(f"--workers={workers}: this process may use {len(cpus)} CPUs")
    keep = cpus[:workers]
    os.sched_setaffinity(0, keep)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_inter_op_parallelism_threads(workers)
    tf.config.threading.set_intra_op_parallelism_threads(workers)
    return keep


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def voc_data_config(data_dir: str):
    """The VOC data section of the recipes with the widest random rescale (0.5-2.0, the
    GSAG recipe's; the heaviest host work of the shipped configs), mirror, reading from
    ``data_dir``."""
    data = copy.deepcopy(config_lib.recipe("voc_r101").data)
    data.scale_range = (0.5, 2.0)
    data.data_dir = os.fspath(data_dir)
    return data


def is_prepared(data_dir: str) -> bool:
    """Whether ``voc2012`` is built in ``data_dir``."""
    data_dir = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(os.path.join(data_dir, "voc2012")):
        return False  # asking TFDS would warn and leave an empty folder in /tmp
    from scaleattn.data import voc  # pylint: disable=import-outside-toplevel
    return voc.Voc2012(data_dir=data_dir).is_prepared()


@contextlib.contextmanager
def _tempfiles_in(folder: str):
    """TFDS leaves an empty ``mkdtemp`` folder per build: keep it in ``folder``."""
    before = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = before


def build_synthetic(work_dir: str, num_train_aug: int, num_val: int, *,
                    image_size: tuple[int, int] = IMAGE_SIZE, seed: int = 0) -> str:
    """Builds a synthetic ``voc2012`` under ``work_dir``/data; returns that data_dir.

    `fake_voc` writes the archives into ``work_dir``/manual; the real builder
    builds them. The archives are deleted afterwards (the dataset is what is read).
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from benchmarks import fake_voc  # pylint: disable=import-outside-toplevel
    data_dir = os.path.join(work_dir, "data")
    manual_dir = os.path.join(work_dir, "manual")
    tfds.disable_progress_bar()
    with _tempfiles_in(work_dir):
        fake_voc.build_synthetic(data_dir, manual_dir, num_train_aug, num_val,
                                 size=image_size, seed=seed)
    shutil.rmtree(manual_dir, ignore_errors=True)
    return data_dir


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _time_window(counts: Iterator[int], seconds: float) -> tuple[int, float, float]:
    """Pulls batches for ``seconds`` (at least one); returns (images, wall s, CPU s).

    CPU s is this process's user + system time over the window, all threads.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    images, elapsed = 0, 0.0
    for count in counts:
        images += count
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    if elapsed <= 0:
        raise RuntimeError("the pipeline yielded no batch")
    return images, elapsed, time.process_time() - cpu_start


def _measure(counts: Iterator[int], *, seconds: float, warmup_seconds: float,
             repeats: int) -> dict:
    """Warm-up, then ``repeats`` timed windows of one iterator; closes it."""
    figures = {"images_per_s": [], "images_per_cpu_s": [], "cpus_busy": [], "load1": []}
    try:
        _time_window(counts, warmup_seconds)
        for _ in range(repeats):
            images, wall, cpu = _time_window(counts, seconds)
            figures["images_per_s"].append(images / wall)
            figures["images_per_cpu_s"].append(images / cpu if cpu > 0 else float("nan"))
            figures["cpus_busy"].append(cpu / wall)
            figures["load1"].append(os.getloadavg()[0])
    finally:
        counts.close()  # stop the tf.data threads before the next measurement
        gc.collect()
    figures["mean_images_per_s"] = statistics.fmean(figures["images_per_s"])
    figures["mean_images_per_cpu_s"] = statistics.fmean(figures["images_per_cpu_s"])
    return figures


def _train_counts(data_config, batch_size: int, seed: int, ignore_label: int
                  ) -> Iterator[int]:
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    batches = pipeline.train_batches(data_config, batch_size=batch_size, seed=seed,
                                     ignore_label=ignore_label, process_index=0,
                                     process_count=1)
    for batch in batches:
        yield len(batch["image"])


def _eval_counts(data_config, batch_size: int, ignore_label: int) -> Iterator[int]:
    """Real (non-filler) images per eval batch, pass after pass."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    total = pipeline.num_examples(data_config, data_config.eval_split)
    while True:
        batches = pipeline.eval_batches(data_config, batch_size=batch_size,
                                        ignore_label=ignore_label, process_index=0,
                                        process_count=1)
        for index, batch in enumerate(batches):
            assert len(batch["image"]) == batch_size
            yield max(0, min(batch_size, total - index * batch_size))


# The host train pipeline cut after each stage (`_stage_counts`), in order; the full
# pipelines (`train_batches` with augment_on 'host' / 'device') follow them.
STAGES = ("read", "decode", "rescale")
STAGE_NAMES = {"read": "read records (shuffled stream)",
               "decode": "+ decode (JPEG, PNG)",
               "rescale": "+ random rescale (bilinear image, nearest label)",
               "host": "+ pad, crop, flip, normalise, batch = train, host",
               "device": "decode + put on the canvas, batch = train, device"}


def _stage_counts(data_config, stage: str, batch_size: int, seed: int,
                  ignore_label: int) -> Iterator[int]:
    """Images per batch of the training stream cut after ``stage`` (one of `STAGES`).

    The stream, decoding and rescale are the production ones (`pipeline`); each image
    is then reduced to 4 numbers (its size and first pixel / label, which need the
    whole stage's output) so that the cut stream batches like the real one.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    builder = pipeline._prepared_builder(data_config)  # pylint: disable=protected-access
    split = data_config.train_split
    num_records = builder.info.splits[split].num_examples
    base_key = tf.constant([seed, 0], tf.int64)
    stream = pipeline._example_stream(  # pylint: disable=protected-access
        pipeline._read_encoded(builder, split), num_records,  # pylint: disable=protected-access
        base_key, 0, min(data_config.shuffle_buffer, num_records))
    augment_key = tf.random.experimental.stateless_fold_in(base_key, 2)
    features = builder.info.features

    def cut(position, example):
        if stage == "read":
            return tf.stack([tf.strings.length(example["image"]),
                             tf.strings.length(example["segmentation"]), 0, 0])
        image, label = pipeline._decode(  # pylint: disable=protected-access
            features, example, ignore_label)
        if stage == "rescale":
            key = tf.random.experimental.stateless_fold_in(augment_key, position)
            image, label = pipeline.rescale(
                image, label, tf.random.experimental.stateless_split(key, 7)[0],
                scale_range=tuple(data_config.scale_range))
        shape = tf.shape(image)
        return tf.stack([shape[0], shape[1], tf.cast(image[0, 0, 0], tf.int32),
                         tf.cast(label[0, 0, 0], tf.int32)])

    ds = stream.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(data_config.prefetch)
    for batch in ds.as_numpy_iterator():
        yield len(batch)


def breakdown(rows: dict[str, float]) -> list[dict]:
    """Per-stage cost from cumulative images per CPU-second.

    ``rows`` maps 'read', 'decode', 'rescale', 'host', 'device' (those measured) to
    the images per CPU-second of the stream up to that stage. A stage's cost is the
    difference of the CPU seconds per image of its row and of the row before it
    ('device' follows 'decode'); on a busy host two close figures can give a small or
    even negative difference, reported as it is.
    """
    before = {"decode": "read", "rescale": "decode", "host": "rescale", "device": "decode"}
    result = []
    for stage in STAGES + ("host", "device"):
        if stage not in rows:
            continue
        cost = 1.0 / rows[stage]
        if stage in before and before[stage] in rows:
            cost -= 1.0 / rows[before[stage]]
        elif stage != "read":
            cost = float("nan")  # the row before it was not measured
        result.append({"stage": stage, "cumulative_images_per_cpu_s": rows[stage],
                       "stage_cpu_ms_per_image": 1e3 * cost,
                       "stage_images_per_cpu_s": 1.0 / cost if cost > 0 else float("inf")})
    return result


def benchmark(data_config, *, crop_sizes=(321,), batch_size: int = 16,
              eval_size: int | None = 513, eval_batch_size: int | None = None,
              seconds: float = 20.0, warmup_seconds: float | None = None,
              repeats: int = 2, seed: int = 0, augment_on=("host", "device"),
              stages: bool = False,
              ignore_label: int = config_lib.VOC_IGNORE_LABEL) -> dict:
    """Images/s of the train pipeline at each crop, and of the eval pipeline.

    Args:
      data_config: the config's ``data`` section; its dataset must be prepared.
      crop_sizes: train crops to time, one after the other (host augmentation; the
        device path's host work does not depend on the crop and is timed once).
      batch_size: train batch; ``eval_batch_size`` defaults to it.
      eval_size: the eval square and the device path's canvas; None skips the eval
        pipeline (the canvas is then data.eval_size).
      seconds: length of one timed window; ``repeats`` windows per figure.
      warmup_seconds: untimed pulling first (default ``seconds / 4``).
      augment_on: the train pipelines to time, 'host' and / or 'device'.
      stages: also time the host stream cut after each of `STAGES` (first crop) and
        add ``breakdown`` (see `breakdown`).
      ignore_label: the label of boundaries and padding (`config.loss.ignore_label`).
    Returns:
      A JSON-able dict: ``dataset``, ``host``, ``settings``, ``results`` and, with
      ``stages``, ``breakdown``. ``results`` is a list of ``{"pipeline": "train" |
      "eval" | "stage", "augment_on" (train) / "stage" (stage), "size" (train: the
      crop; device: also "canvas"), "batch_size", "images_per_s": [one per window],
      "images_per_cpu_s": [images per second of this process's CPU time],
      "cpus_busy": [CPU s / wall s: how many cores it actually got], "load1": [the
      1-minute load average after each window], "mean_images_per_s",
      "mean_images_per_cpu_s"}``.
    """
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    if repeats < 1 or seconds <= 0:
        raise ValueError(f"need repeats >= 1 and seconds > 0, got {repeats}, {seconds}")
    for where in augment_on:
        config_lib.check_choice("data.augment_on", where)
    warmup_seconds = seconds / 4 if warmup_seconds is None else warmup_seconds
    eval_batch_size = eval_batch_size or batch_size
    result = {
        "dataset": {
            "name": data_config.name,
            "data_dir": os.path.expanduser(data_config.data_dir),
            "train_split": data_config.train_split,
            "train_examples": pipeline.num_examples(data_config, data_config.train_split),
            "eval_split": data_config.eval_split,
            "eval_examples": pipeline.num_examples(data_config, data_config.eval_split),
        },
        "host": {"cpus": available_cpus(), "loadavg_start": list(os.getloadavg())},
        "settings": {"seconds": seconds, "warmup_seconds": warmup_seconds,
                     "repeats": repeats, "seed": seed,
                     "scale_range": list(data_config.scale_range),
                     "flip": bool(data_config.flip)},
        "results": [],
    }
    base = copy.deepcopy(data_config)
    if eval_size:
        base.eval_size = int(eval_size)
    base.canvas_size = 0  # the canvas is the eval square

    def measure(counts):
        return _measure(counts, seconds=seconds, warmup_seconds=warmup_seconds,
                        repeats=repeats)

    cumulative = {}
    if stages:
        config = copy.deepcopy(base)
        config.crop_size = int(crop_sizes[0])
        for stage in STAGES:
            figures = measure(_stage_counts(config, stage, batch_size, seed, ignore_label))
            cumulative[stage] = figures["mean_images_per_cpu_s"]
            result["results"].append({"pipeline": "stage", "stage": stage,
                                      "size": int(crop_sizes[0]), "batch_size": batch_size,
                                      **figures})
    for where in augment_on:
        for crop in crop_sizes if where == "host" else crop_sizes[:1]:
            config = copy.deepcopy(base)
            config.crop_size, config.augment_on = int(crop), where
            figures = measure(_train_counts(config, batch_size, seed, ignore_label))
            row = {"pipeline": "train", "augment_on": where, "size": int(crop),
                   "batch_size": batch_size, **figures}
            if where == "device":
                row["canvas"] = pipeline.canvas_size(config)
            result["results"].append(row)
            if crop == crop_sizes[0]:
                cumulative[where] = figures["mean_images_per_cpu_s"]
    if stages:
        result["breakdown"] = breakdown(cumulative)
    if eval_size:
        figures = measure(_eval_counts(base, eval_batch_size, ignore_label))
        result["results"].append({"pipeline": "eval", "size": int(eval_size),
                                  "batch_size": eval_batch_size, **figures})
    result["host"]["loadavg_end"] = list(os.getloadavg())
    return result


def row_name(row: dict) -> str:
    """'train/host', 'train/device', 'stage/decode', 'eval'."""
    if row["pipeline"] == "train":
        return f"train/{row.get('augment_on', 'host')}"
    if row["pipeline"] == "stage":
        return f"stage/{row['stage']}"
    return row["pipeline"]


def format_table(result: dict) -> str:
    """The results as a small text table (and the per-stage costs, if measured)."""
    ds, host = result["dataset"], result["host"]
    lines = [
        f"data: {ds['name']} in {ds['data_dir']}"
        + (" (synthetic)" if result.get("synthetic") else "")
        + f": {ds['train_split']} {ds['train_examples']}, {ds['eval_split']} "
          f"{ds['eval_examples']} images",
        f"host: {host['cpus']} CPUs for this process; load average (1/5/15 min) at start "
        + " ".join(f"{x:.2f}" for x in host["loadavg_start"]) + ", at end "
        + " ".join(f"{x:.2f}" for x in host.get("loadavg_end", [])),
        f"{'pipeline':14s} {'size':>5s} {'batch':>5s}  {'img/s per window':<17s} "
        f"{'mean':>6s}  {'img/CPU-s':<12s} {'CPUs busy':<10s} load1",
    ]
    for row in result["results"]:
        rates = " ".join(f"{r:.1f}" for r in row["images_per_s"])
        per_cpu = " ".join(f"{r:.1f}" for r in row["images_per_cpu_s"])
        busy = " ".join(f"{x:.2f}" for x in row["cpus_busy"])
        loads = " ".join(f"{x:.1f}" for x in row["load1"])
        lines.append(f"{row_name(row):14s} {row['size']:5d} {row['batch_size']:5d}  "
                     f"{rates:<17s} {row['mean_images_per_s']:6.1f}  {per_cpu:<12s} "
                     f"{busy:<10s} {loads}"
                     + (f"  (canvas {row['canvas']})" if "canvas" in row else ""))
    if result.get("breakdown"):
        lines.append("host cost per stage (CPU time of this process; stage = difference of "
                     "cumulative costs):")
        lines.append(f"  {'stage':52s} {'cumul. img/CPU-s':>16s} {'stage CPU ms/img':>16s} "
                     f"{'stage img/CPU-s':>15s}")
        for row in result["breakdown"]:
            lines.append(f"  {STAGE_NAMES[row['stage']]:52s} "
                         f"{row['cumulative_images_per_cpu_s']:16.1f} "
                         f"{row['stage_cpu_ms_per_image']:16.2f} "
                         f"{row['stage_images_per_cpu_s']:15.1f}")
    return "\n".join(lines)


def consumer_line(result: dict, step_batch: int, step_seconds: float) -> str:
    """What a training step of ``step_batch`` images taking ``step_seconds`` consumes.

    The cores needed are estimated from images per CPU-second (linear scaling
    over cores assumed), which does not depend on how busy the host was.
    """
    need = step_batch / step_seconds
    parts = [f"a train step of batch {step_batch} taking {step_seconds:g} s consumes "
             f"{need:.1f} img/s"]
    for row in result["results"]:
        if row["pipeline"] == "train":
            parts.append(f"{row_name(row)} crop {row['size']}: "
                         f"{row['mean_images_per_cpu_s']:.1f} img/CPU-s "
                         f"-> ~{need / row['mean_images_per_cpu_s']:.1f} busy cores needed")
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.input_pipeline",
        description="Images/s of the tf.data train and eval pipelines on this host.")
    parser.add_argument("--crop", default="321",
                        help="train crop size(s), comma-separated (default 321)")
    parser.add_argument("--batch", type=int, default=16, help="train batch size")
    parser.add_argument("--augment_on", default="host,device",
                        help="train pipelines to time: data.augment_on values, "
                             "comma-separated (default host,device)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the host train stream cut after each stage "
                             "(read, decode, rescale) and report each stage's cost")
    parser.add_argument("--eval_batch", type=int, default=0,
                        help="eval batch size (default: --batch)")
    parser.add_argument("--eval_size", type=int, default=513,
                        help="eval square; 0 skips the eval pipeline")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                        help="TFDS data dir; a prepared voc2012 there is used")
    parser.add_argument("--synthetic", action="store_true",
                        help="use a synthetic voc2012 even if data_dir has one")
    parser.add_argument("--num_images", type=int, default=200,
                        help="synthetic set: train_aug images")
    parser.add_argument("--num_val", type=int, default=0,
                        help="synthetic set: val images (default: --num_images)")
    parser.add_argument("--image_size", type=_size, default=IMAGE_SIZE,
                        help="synthetic set: WIDTHxHEIGHT of every image (default 500x375)")
    parser.add_argument("--seconds", type=float, default=20.0, help="one timed window")
    parser.add_argument("--warmup", type=float, default=None,
                        help="untimed seconds before the windows (default seconds/4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed windows per figure")
    parser.add_argument("--workers", type=int, default=0,
                        help="pin to this many CPUs (default: all this process may use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step_batch", type=int, default=30,
                        help="with --step_seconds: the consumer side, a train step's batch")
    parser.add_argument("--step_seconds", type=float, default=0.0,
                        help="a train step's time; prints what the step consumes")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with values that cannot work (``None`` if nothing): checked before
    the measurement, which takes minutes, ``--output`` included. Sets ``args.crops``."""
    try:
        args.crops = [int(c) for c in args.crop.split(",") if c.strip()]
    except ValueError:
        return f"--crop={args.crop}: comma-separated integers expected, e.g. 321,513"
    if not args.crops or min(args.crops) < 1:
        return f"--crop={args.crop}: positive crop sizes expected"
    args.augment_ons = [a.strip() for a in args.augment_on.split(",") if a.strip()]
    for where in args.augment_ons:
        try:
            config_lib.check_choice("data.augment_on", where)
        except config_lib.ConfigError:
            return (f"--augment_on={args.augment_on}: each must be one of "
                    f"{config_lib.CHOICES['data.augment_on']}")
    if args.breakdown and "host" not in args.augment_ons:
        return "--breakdown needs the host pipeline in --augment_on"
    for name in ("batch", "num_images", "repeats"):
        if getattr(args, name) < 1:
            return f"--{name}={getattr(args, name)} must be at least 1"
    if args.seconds <= 0 or (args.warmup is not None and args.warmup < 0):
        return "--seconds must be positive and --warmup not negative"
    if args.output:
        try:
            outputs.check_file(args.output, "--output")
        except outputs.OutputError as e:
            return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    crops = args.crops
    if args.workers:
        try:
            limit_workers(args.workers)  # before TensorFlow starts its thread pools
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    num_val = args.num_val or args.num_images
    work_dir = None
    try:
        data_dir = os.path.expanduser(args.data_dir)
        synthetic = args.synthetic or not is_prepared(data_dir)
        if synthetic:
            square = args.eval_size or voc_data_config(data_dir).eval_size
            if max(args.image_size) > square:
                print(f"error: --image_size={args.image_size[0]}x{args.image_size[1]} does "
                      f"not fit in the eval square / canvas {square} (--eval_size)",
                      file=sys.stderr)
                return 2
            work_dir = tempfile.mkdtemp(prefix="input_pipeline.")
            print(f"voc2012 is not prepared in {data_dir}; building a synthetic one with "
                  f"{args.num_images} train_aug + {num_val} val images of "
                  f"{args.image_size[0]}x{args.image_size[1]} in {work_dir} ...",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            data_dir = build_synthetic(work_dir, args.num_images, num_val,
                                       image_size=args.image_size, seed=args.seed)
            print(f"built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        result = benchmark(voc_data_config(data_dir), crop_sizes=crops, batch_size=args.batch,
                           eval_size=args.eval_size or None,
                           eval_batch_size=args.eval_batch or None, seconds=args.seconds,
                           warmup_seconds=args.warmup, repeats=args.repeats, seed=args.seed,
                           augment_on=args.augment_ons, stages=args.breakdown,
                           ignore_label=config_lib.recipe("voc_r101").loss.ignore_label)
        result["synthetic"] = synthetic
        if synthetic:
            result["dataset"]["synthetic_image_size"] = list(args.image_size)
    finally:
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(format_table(result))
    if args.step_seconds:
        print(consumer_line(result, args.step_batch, args.step_seconds))
    if args.output:
        outputs.atomic_write(args.output, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
