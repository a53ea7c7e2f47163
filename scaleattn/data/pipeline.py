"""tf.data input pipeline for any segmentation TFDS dataset of this project.

Works on every builder with the features `image` (RGB uint8), `segmentation`
(single-channel uint8 class indices, `config.VOC_IGNORE_LABEL` = 255 on boundaries)
and `image_id`: the demo `scale_shapes` (`scaleattn.data.shapes`) and `voc2012`
(`scaleattn.data.voc`). Batches are dicts of numpy arrays (docs/design.md, "One
training step"):

* eval, and train with data.augment_on='host': `image` float32 [b, H, W, 3]
  normalised with data.mean / data.std, `label` int32 [b, H, W];
* train with data.augment_on='device': `image` uint8 [b, S, S, 3] and `label`
  uint8 [b, S, S], each decoded image at the top-left of an S = data.canvas_size
  (default data.eval_size) square, and `size` int32 [b, 2], its true (height,
  width); the train step rescales, crops and flips them (`scaleattn.augment`).

Design choices:

* **Per-process shards.** Each process reads its own contiguous, disjoint part
  of the split (`tfds.even_splits`, remainders spread over the first ones)
  before anything is shuffled, so the union over processes is the split.
* **Exact resume.** The training stream is a pure function of (seed, process,
  position). Epoch `e` is the shard's records shuffled with a seed derived from
  (seed, process, e); every example is then augmented with stateless random
  ops keyed by (seed, process, its position in the stream). Resuming at step
  `k` starts at epoch `k*b // n` and skips `k*b % n` records of it - skipped
  records are still encoded bytes (`SkipDecoding`), so skipping costs at most
  one epoch of reading, never decoding or augmenting. `train_batches(...,
  start_step=k)` therefore yields exactly what the (k+1)-th, (k+2)-th ...
  batches of a fresh stream would be. (tf.data mixes TensorFlow's global seed
  into the shuffle seed; nothing in this project sets it, and TensorFlow is
  imported only here.)
* **Ignore label.** The label files mark boundaries with 255
  (`config.VOC_IGNORE_LABEL`); every batch carries the caller's `ignore_label`
  (`config.loss.ignore_label`, a required argument) there and in all padding, so
  the loss, the metrics and the padding always agree.
* **Augmentation** (data.augment_on='host'; the device path follows the same
  recipe). Random rescale in data.scale_range, or to one of data.scale_set
  (bilinear image, nearest label), pad to the crop with the mean pixel (0 after
  normalisation) and the ignore label, random crop, random horizontal flip. An
  image smaller than the crop is placed at a random offset inside it.
* **Evaluation.** One pass; each image sits at the top-left of a
  data.eval_size square (mean pixel / ignore label around it). Every process
  yields the same number of full batches (collectives need that): the tail is
  filled with all-ignore examples, which no metric counts.
* **TensorFlow stays here.** Only `scaleattn.data` imports TensorFlow; JAX is
  imported lazily, only to ask for the process index / count.
"""

import math
import os
import re
import time
from typing import Iterator

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from scaleattn import config as config_lib
from scaleattn.data import buildlock, errors, eval_input, shapes

_EVAL_SIZE_ERROR = "image larger than data.eval_size"
_CANVAS_SIZE_ERROR = "image larger than data.canvas_size"
_LABEL_ERROR = "label outside the classes"


class DatasetNotFoundError(errors.DataError, RuntimeError):
    """The dataset is not prepared in data.data_dir (and cannot be built here)."""


class DamagedDatasetError(errors.DataError):
    """Records of a prepared dataset that cannot be read (truncated, corrupted)."""


class LabelError(errors.DataError):
    """A label value that is neither a class nor the ignore label."""


# ----------------------------------------------------------------- builders ---


def get_builder(data_config) -> tfds.core.DatasetBuilder:
    """The TFDS builder of data.name in data.data_dir (not necessarily built)."""
    data_dir = os.path.expanduser(data_config.data_dir)
    if data_config.name == "scale_shapes":
        config = shapes.shapes_config(data_config.demo_train_size,
                                      data_config.demo_val_size)
        return shapes.ScaleShapes(data_dir=data_dir, config=config)
    if data_config.name == "voc2012":
        try:
            from scaleattn.data import voc  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError(
                "data.name='voc2012' needs the VOC builder "
                f"scaleattn.data.voc.Voc2012, which could not be imported: {e}"
            ) from e
        return voc.Voc2012(data_dir=data_dir)
    raise ValueError(f"unknown data.name {data_config.name!r}; expected "
                     "'scale_shapes' or 'voc2012'")


def class_names(data_config) -> tuple[str, ...]:
    """The names of data.name's classes, by label index (the builder module's
    ``CLASS_NAMES``)."""
    if data_config.name == "scale_shapes":
        return shapes.CLASS_NAMES
    from scaleattn.data import voc  # pylint: disable=import-outside-toplevel
    return voc.CLASS_NAMES


def _not_prepared_message(data_config, builder) -> str:
    data_dir = os.path.expanduser(data_config.data_dir)
    if data_config.name == "voc2012":
        manual_dir = data_config.manual_dir or "<folder with the archives>"
        return (
            f"The VOC 2012 dataset is not prepared in data.data_dir={data_dir} "
            f"(expected {builder.data_path}). It is built once from the "
            "archives VOCtrainval_11-May-2012.tar (VOC 2012) and benchmark.tgz "
            "(SBD), which must both be in data.manual_dir (now "
            f"{data_config.manual_dir!r}); prepare it with `python -m "
            f"scaleattn.data.build --data_dir={data_dir} "
            f"--manual_dir={manual_dir}`, then run again.")
    return (f"Dataset {data_config.name} is not prepared in {data_dir} "
            f"(expected {builder.data_path}); call "
            "scaleattn.data.pipeline.ensure_prepared(config.data) first.")


def ensure_prepared(data_config) -> None:
    """Builds `scale_shapes` if needed; raises if `voc2012` is not prepared.

    Raises:
      DatasetNotFoundError: voc2012 is not in data.data_dir (the message says
        which archives go where and which command prepares it).
    """
    builder = get_builder(data_config)
    if builder.is_prepared():
        logging.info("Dataset %s is prepared at %s", data_config.name,
                     builder.data_path)
        return
    if data_config.name != "scale_shapes":
        raise DatasetNotFoundError(_not_prepared_message(data_config, builder))
    with buildlock.held(data_config.data_dir, data_config.name):
        builder = get_builder(data_config)  # another process may have built it meanwhile
        if builder.is_prepared():
            return
        logging.info("Building the demo dataset %s (config %s) in %s ...",
                     builder.name, builder.builder_config.name, builder.data_path)
        start = time.time()
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False))
        logging.info("Built %s in %.1f s", builder.data_path, time.time() - start)


def _prepared_builder(data_config) -> tfds.core.DatasetBuilder:
    builder = get_builder(data_config)
    if not builder.is_prepared():
        raise DatasetNotFoundError(_not_prepared_message(data_config, builder))
    return builder


def check_split(data_config, builder, split: str, key: str) -> None:
    """`DataError` naming ``config.data.<key>`` unless the dataset has ``split``."""
    name = split.split("[", 1)[0]
    if name not in builder.info.splits:
        raise errors.DataError(
            f"config.data.{key}={split!r}: dataset {data_config.name} in "
            f"{builder.data_path} has no such split (it has "
            f"{', '.join(sorted(builder.info.splits))})")


def _encoded_size(data: tf.Tensor) -> tf.Tensor:
    """(height, width) int32 of an encoded PNG or JPEG image, read from its header."""
    def png():
        b = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int32)
        width = b[0] * 2**24 + b[1] * 2**16 + b[2] * 2**8 + b[3]
        height = b[4] * 2**24 + b[5] * 2**16 + b[6] * 2**8 + b[7]
        return tf.stack([height, width])
    return tf.cond(tf.strings.substr(data, 0, 4) == b"\x89PNG", png,
                   lambda: tf.image.extract_jpeg_shape(data)[:2])


def largest_image(data_config, split: str) -> tuple[int, int, str]:
    """``(longest side, index, image_id)`` of the largest image of ``split``, read from
    the image headers (nothing decoded), so that a size that only matters after
    training (data.eval_size) is checked before it."""
    builder = _prepared_builder(data_config)
    ds = _read_encoded(builder, split).map(
        lambda example: (tf.reduce_max(_encoded_size(example["image"])),
                         example["image_id"]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    best = (0, -1, "")
    for index, (side, image_id) in enumerate(
            _raise_data_errors(ds.as_numpy_iterator(), builder)):
        if side > best[0]:
            best = (int(side), index, image_id.decode() if isinstance(image_id, bytes)
                    else str(image_id))
    return best


def check_sizes(data_config) -> None:
    """Before training: the splits exist, and the images fit data.eval_size (and, with
    data.augment_on='device', the canvas); `DataError` / `ValueError` naming the key.
    Each process reads the headers of its own part of the splits (one pass over the
    encoded records, nothing decoded)."""
    builder = _prepared_builder(data_config)
    check_split(data_config, builder, data_config.train_split, "train_split")
    check_split(data_config, builder, data_config.eval_split, "eval_split")
    checks = [("eval_split", data_config.eval_split, "eval_size", data_config.eval_size, "")]
    if data_config.augment_on == "device":
        checks.append(("train_split", data_config.train_split, "canvas_size",
                       canvas_size(data_config),
                       " (0 = data.eval_size), or augment on the host (data.augment_on='host')"))
    for split_key, split, key, size, fix in checks:
        index, count = _process(None, None)  # each process checks the part it reads
        side, _, image_id = largest_image(data_config, tfds.even_splits(split, n=count)[index])
        if side > size:
            raise ValueError(
                f"data.{key}={size} is smaller than image {image_id} of "
                f"data.{split_key}={split!r} ({side} pixels on its longest side): set "
                f"data.{key} to at least {side}{fix}.")


def num_examples(data_config, split: str) -> int:
    """Number of examples of `split` (a TFDS split name, e.g. 'val')."""
    return _prepared_builder(data_config).info.splits[split].num_examples


def _process(process_index, process_count) -> tuple[int, int]:
    """(index, count), the missing ones from JAX (imported only if needed)."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        if process_index is None:
            process_index = jax.process_index()
        if process_count is None:
            process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in "
                         f"[0, {process_count})")
    return process_index, process_count


def _read_encoded(builder, split) -> tf.data.Dataset:
    """Records of `split` in stored order, image / segmentation still encoded."""
    # No auto-cache: the training stream re-reads each epoch inside flat_map,
    # and a cache abandoned half-way (skip, stop) only warns and is discarded.
    ds = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding(),
                  "segmentation": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False))
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _decode(features, example, ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded example -> image uint8 [h, w, 3], label uint8 [h, w, 1].

    The files' boundary value `VOC_IGNORE_LABEL` becomes `ignore_label`.
    """
    image = features["image"].decode_example(example["image"])
    label = features["segmentation"].decode_example(example["segmentation"])
    return image, remap_ignore(label, ignore_label)


def remap_ignore(label: tf.Tensor, ignore_label: int) -> tf.Tensor:
    """`label` (uint8, any shape) with VOC_IGNORE_LABEL replaced by `ignore_label`."""
    if ignore_label == config_lib.VOC_IGNORE_LABEL:
        return label
    return tf.where(label == config_lib.VOC_IGNORE_LABEL,
                    tf.constant(ignore_label, label.dtype), label)


# ------------------------------------------------------------ augmentation ---


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
    """(image - mean) / std as float32; `image` [..., 3] in 0..255 RGB."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std


def _randint(key: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Uniform int32 in [0, high] (inclusive) from a stateless key."""
    return tf.random.stateless_uniform([], seed=key, minval=0, maxval=high + 1,
                                       dtype=tf.int32)


def augment(image: tf.Tensor, label: tf.Tensor, key: tf.Tensor, *,
            crop_size: int, scale_range: tuple[float, float], flip: bool,
            mean, std, ignore_label: int, scale_set: tuple[float, ...] = ()
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """Random scale, pad, crop and flip of one example (`rescale`, then `place`).

    A pure function of its inputs: `key` ([2] int64, a stateless RNG seed)
    fixes every random choice.

    Args:
      image: [h, w, 3] uint8 RGB.
      label: [h, w, 1] uint8 class indices, `ignore_label` = ignore.
      key: [2] int seed.
      crop_size: side of the square output.
      scale_range: (low, high) of the uniform random rescale factor.
      flip: whether to flip horizontally with probability 1/2.
      mean, std: per-channel pixel statistics (0..255 RGB).
      ignore_label: the label of the padding.
      scale_set: if not empty, the rescale factor is one of these (uniformly), not
        drawn from `scale_range`.
    Returns:
      image [crop, crop, 3] float32 normalised (padding = 0, the mean pixel),
      label [crop, crop] int32 (padding = `ignore_label`).
    """
    keys = tf.random.experimental.stateless_split(key, 7)
    image, label = rescale(image, label, keys[0], scale_range=scale_range,
                           scale_set=scale_set)
    return place(image, label, keys[1:6], crop_size=crop_size, flip=flip,
                 mean=mean, std=std, ignore_label=ignore_label)


def rescale(image: tf.Tensor, label: tf.Tensor, key: tf.Tensor, *,
            scale_range: tuple[float, float], scale_set: tuple[float, ...] = ()
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """Random rescale: image [h, w, 3] uint8 -> [h', w', 3] float32 0..255
    (bilinear, half-pixel centres), label [h, w, 1] -> [h', w', 1] (nearest);
    (h', w') = max(round((h, w) * s), 1), s ~ U(scale_range) from `key`, or s one
    of `scale_set` (uniformly) when that is not empty."""
    low, high = scale_range
    if scale_set:
        index = tf.random.stateless_uniform([], seed=key, minval=0, maxval=len(scale_set),
                                            dtype=tf.int32)
        scale = tf.gather(tf.constant(scale_set, tf.float32), index)
    else:
        scale = tf.random.stateless_uniform([], seed=key, minval=low,
                                            maxval=high) if high > low else low
    size = tf.cast(tf.shape(image)[:2], tf.float32) * scale
    size = tf.maximum(tf.cast(tf.round(size), tf.int32), 1)
    image = tf.image.resize(tf.cast(image, tf.float32), size, "bilinear")
    label = tf.image.resize(label, size, "nearest")
    return image, label


def place(image: tf.Tensor, label: tf.Tensor, keys: tf.Tensor, *,
          crop_size: int, flip: bool, mean, std, ignore_label: int
          ) -> tuple[tf.Tensor, tf.Tensor]:
    """Pad to the crop (image at a random offset), random crop, random flip,
    normalise.

    Args:
      image: [h, w, 3] float 0..255; label: [h, w, 1].
      keys: [5, 2] seeds: top, left, crop row, crop column, flip.
    Returns:
      image [crop, crop, 3] float32 normalised (padding 0), label [crop, crop]
      int32 (padding `ignore_label`).
    """
    size = tf.shape(image)[:2]
    image = normalize(image, mean, std)
    label = tf.cast(label[..., 0], tf.int32)

    # Pad to at least the crop, the image at a random place inside the padding.
    pad = tf.maximum(crop_size - size, 0)
    top, left = _randint(keys[0], pad[0]), _randint(keys[1], pad[1])
    paddings = [[top, pad[0] - top], [left, pad[1] - left]]
    image = tf.pad(image, paddings + [[0, 0]])
    label = tf.pad(label, paddings, constant_values=ignore_label)

    # Random crop.
    y0 = _randint(keys[2], size[0] + pad[0] - crop_size)
    x0 = _randint(keys[3], size[1] + pad[1] - crop_size)
    image = image[y0:y0 + crop_size, x0:x0 + crop_size]
    label = label[y0:y0 + crop_size, x0:x0 + crop_size]

    if flip:
        do_flip = tf.random.stateless_uniform([], seed=keys[4]) < 0.5
        image = tf.cond(do_flip, lambda: image[:, ::-1], lambda: image)
        label = tf.cond(do_flip, lambda: label[:, ::-1], lambda: label)
    image.set_shape([crop_size, crop_size, 3])
    label.set_shape([crop_size, crop_size])
    return image, label


def canvas_size(data_config) -> int:
    """Side of the square the device-augmentation path puts train images on."""
    return data_config.canvas_size or data_config.eval_size


def put_on_canvas(image: tf.Tensor, label: tf.Tensor, *, canvas: int,
                  ignore_label: int) -> dict[str, tf.Tensor]:
    """One decoded example at the top-left of a `canvas` square, still uint8.

    Args:
      image: [h, w, 3] uint8 with h, w <= canvas (checked by the caller).
      label: [h, w, 1] uint8.
    Returns:
      {'image': uint8 [canvas, canvas, 3] (padding 0), 'label': uint8
      [canvas, canvas] (padding `ignore_label`), 'size': int32 [2] = (h, w)}.
    """
    size = tf.shape(image)[:2]
    paddings = [[0, canvas - size[0]], [0, canvas - size[1]]]
    image = tf.pad(image, paddings + [[0, 0]])
    label = tf.pad(label[..., 0], paddings,
                   constant_values=tf.constant(ignore_label, tf.uint8))
    image.set_shape([canvas, canvas, 3])
    label.set_shape([canvas, canvas])
    return {"image": image, "label": label, "size": tf.cast(size, tf.int32)}


# ---------------------------------------------------------------- training ---


def _example_stream(records: tf.data.Dataset, num_records: int, base_key,
                    start: int, shuffle_buffer: int) -> tf.data.Dataset:
    """Infinite (position, record) stream, reshuffled per epoch, from `start`.

    Epoch `e` holds positions [e * n, (e + 1) * n) in an order that depends only
    on (base_key, e); the first `start` positions are skipped (undecoded).
    """
    order_key = tf.random.experimental.stateless_fold_in(base_key, 1)

    def one_epoch(epoch):
        epoch_key = tf.random.experimental.stateless_fold_in(order_key, epoch)
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=epoch_key, minval=0, maxval=2**31 - 1, dtype=tf.int64)
        shuffled = records.shuffle(shuffle_buffer, seed=shuffle_seed,
                                   reshuffle_each_iteration=False)
        return shuffled.enumerate(start=epoch * num_records)

    first_epoch, offset = divmod(start, num_records)
    epochs = tf.data.Dataset.counter(first_epoch, dtype=tf.int64)
    return epochs.flat_map(one_epoch).skip(offset)


def train_batches(data_config, *, batch_size: int, seed: int, ignore_label: int,
                  start_step: int = 0, start_example: int | None = None,
                  num_classes: int | None = None, process_index: int | None = None,
                  process_count: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this process's training batches.

    Args:
      data_config: the config's `data` section.
      batch_size: examples per batch of this process.
      seed: the run's seed; with the process index it fixes the whole stream.
      ignore_label: `config.loss.ignore_label`: boundaries and padding.
      start_step: batches to skip: the result's first batch is batch number
        `start_step` (0-based) of a fresh stream.
      start_example: examples of this process's stream to skip instead (a run
        resumed with another batch size continues at the same example);
        default `start_step * batch_size`.
      num_classes: if given, a label value that is neither below it nor
        `ignore_label` stops the stream (`LabelError` naming the image).
      process_index, process_count: default to JAX's.
    Yields:
      data.augment_on='host': augmented crops, {'image': float32
      [b, crop, crop, 3], 'label': int32 [b, crop, crop]}.
      data.augment_on='device': decoded examples on the canvas (S =
      `canvas_size`), {'image': uint8 [b, S, S, 3], 'label': uint8 [b, S, S],
      'size': int32 [b, 2]}, for `scaleattn.augment` in the train step.
    Raises:
      ValueError (while iterating, device path): an image is larger than the
      canvas (the message names data.canvas_size).
    """
    config_lib.check_choice("data.augment_on", data_config.augment_on)
    on_device = data_config.augment_on == "device"
    process_index, process_count = _process(process_index, process_count)
    builder = _prepared_builder(data_config)
    split = tfds.even_splits(data_config.train_split, n=process_count)[
        process_index]
    num_records = builder.info.splits[split].num_examples
    if num_records == 0:
        raise ValueError(f"process {process_index} of {process_count} has no "
                         f"examples of {data_config.train_split}")
    base_key = tf.constant([seed, process_index], tf.int64)
    stream = _example_stream(_read_encoded(builder, split), num_records,
                             base_key, start_step * batch_size
                             if start_example is None else start_example,
                             min(data_config.shuffle_buffer, num_records))
    augment_key = tf.random.experimental.stateless_fold_in(base_key, 2)
    features = builder.info.features
    canvas = canvas_size(data_config)

    def prepare(position, example):
        image, label = _decode(features, example, ignore_label)
        _assert_labels(label, example, num_classes, ignore_label)
        if on_device:
            tf.debugging.Assert(
                tf.reduce_all(tf.shape(image)[:2] <= canvas),
                [f"{_CANVAS_SIZE_ERROR}={canvas}: image", example["image_id"],
                 "of shape", tf.shape(image)])
            return put_on_canvas(image, label, canvas=canvas,
                                 ignore_label=ignore_label)
        key = tf.random.experimental.stateless_fold_in(augment_key, position)
        image, label = augment(
            image, label, key, crop_size=data_config.crop_size,
            scale_range=tuple(data_config.scale_range), flip=data_config.flip,
            mean=data_config.mean, std=data_config.std,
            ignore_label=ignore_label, scale_set=tuple(data_config.scale_set))
        return {"image": image, "label": label}

    ds = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(
        data_config.prefetch)
    return _raise_data_errors(ds.as_numpy_iterator(), builder)


def _assert_labels(label: tf.Tensor, example, num_classes: int | None,
                   ignore_label: int) -> None:
    """In-graph check that every label is a class (< num_classes) or the ignore label."""
    if num_classes is None:
        return
    values = tf.cast(label, tf.int32)
    bad = tf.logical_and(values >= num_classes, values != ignore_label)
    tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [f"{_LABEL_ERROR} 0..{num_classes - 1} (model.num_classes={num_classes}) and not "
         f"the ignore label {ignore_label}: image", example["image_id"], "has label",
         tf.reduce_max(tf.where(bad, values, -1))])


# -------------------------------------------------------------- evaluation ---


def pad_for_eval(image: tf.Tensor, label: tf.Tensor, *, eval_size: int, mean,
                 std, ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Normalises and pads one example to the eval square (image top-left), with the
    numpy functions `--mode=predict` uses too (`eval_input`).

    Args:
      image: [h, w, 3] uint8 with h, w <= eval_size (checked by the caller).
      label: [h, w, 1] uint8.
    Returns:
      image [S, S, 3] float32 (padding 0 = mean pixel), label [S, S] int32
      (padding `ignore_label`).
    """
    size = (eval_size, eval_size)

    def pad(image, label):
        return (eval_input.eval_image(image, size, mean, std),
                eval_input.eval_label(label[..., 0], size, ignore_label))

    image, label = tf.numpy_function(pad, [image, label], [tf.float32, tf.int32],
                                     stateful=False)
    image.set_shape([eval_size, eval_size, 3])
    label.set_shape([eval_size, eval_size])
    return image, label


def eval_batches(data_config, *, batch_size: int, ignore_label: int,
                 split: str | None = None, num_classes: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's part of the eval split, in full batches.

    Every process yields ceil(ceil(N / process_count) / batch_size) batches;
    slots without an example hold an all-ignore example (label `ignore_label`,
    image 0).

    Args:
      data_config: the config's `data` section.
      batch_size: examples per batch of this process.
      ignore_label: `config.loss.ignore_label`: boundaries and padding.
      split: TFDS split; default data.eval_split.
      num_classes: if given, labels are checked as in `train_batches`.
    Yields:
      {'image': float32 [b, S, S, 3], 'label': int32 [b, S, S]},
      S = data.eval_size.
    Raises:
      ValueError (while iterating): an image is larger than data.eval_size.
    """
    process_index, process_count = _process(process_index, process_count)
    builder = _prepared_builder(data_config)
    split = split or data_config.eval_split
    check_split(data_config, builder, split, "eval_split")
    size = data_config.eval_size
    total = builder.info.splits[split].num_examples
    local_split = tfds.even_splits(split, n=process_count)[process_index]
    local = builder.info.splits[local_split].num_examples
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    features = builder.info.features

    def prepare(example):
        image, label = _decode(features, example, ignore_label)
        _assert_labels(label, example, num_classes, ignore_label)
        tf.debugging.Assert(
            tf.reduce_all(tf.shape(image)[:2] <= size),
            [f"{_EVAL_SIZE_ERROR}={size}: image", example["image_id"],
             "of shape", tf.shape(image)])
        image, label = pad_for_eval(image, label, eval_size=size,
                                    mean=data_config.mean, std=data_config.std,
                                    ignore_label=ignore_label)
        return {"image": image, "label": label}

    filler = {"image": tf.zeros([size, size, 3], tf.float32),
              "label": tf.fill([size, size], tf.constant(ignore_label))}
    ds = _read_encoded(builder, local_split).map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(
        num_batches * batch_size - local))
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(
        data_config.prefetch)
    return _raise_data_errors(ds.as_numpy_iterator(), builder)


def _raise_data_errors(batches, builder):
    """Re-raises the in-graph checks as one-line errors: sizes as ValueErrors naming the
    data.* key, labels as `LabelError`, unreadable records as `DamagedDatasetError`
    naming the dataset's folder and how to rebuild it."""
    try:
        yield from batches
    except tf.errors.DataLossError as e:
        detail = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message)  # TensorFlow's internals
        detail = " ".join(detail.split()).strip(" :") or "unreadable record"
        raise DamagedDatasetError(
            f"the dataset files in {builder.data_path} are damaged ({detail}): delete that "
            f"folder and build it again (the demo set is rebuilt on the next run; VOC with "
            f"python -m scaleattn.data.build)") from None
    except tf.errors.InvalidArgumentError as e:
        if _LABEL_ERROR in e.message:
            detail = e.message.split("assertion failed:", 1)[-1].splitlines()[0]
            found = re.search(r"classes (.+\)) and not the ignore label (\d+): image\W+(\w+)"
                              r"\W+has label\W+(-?\d+)", detail)
            classes, ignore, image_id, value = found.groups()
            raise LabelError(f"image {image_id} of the dataset in {builder.data_path} has "
                             f"label {value}, neither a class {classes} nor the ignore label "
                             f"{ignore}: fix the label files, or model.num_classes / "
                             f"loss.ignore_label") from None
        if _EVAL_SIZE_ERROR in e.message:
            key, what, fix = "eval_size", "An eval image", ""
        elif _CANVAS_SIZE_ERROR in e.message:
            key, what = "canvas_size", "A train image"
            fix = (" (0 = data.eval_size), or augment on the host "
                   "(data.augment_on='host')")
        else:
            raise
        detail = e.message.split("assertion failed:", 1)[-1].splitlines()[0]
        size = detail.split(f"data.{key}=", 1)[-1].split(":", 1)[0]
        raise ValueError(
            f"{what} is larger than data.{key}={size} ({detail.strip()}); set "
            f"data.{key} to at least the largest image side{fix}.") from None
