"""The tf.data pipeline: augmentation invariants, exact resume, shards, eval."""
import itertools
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from scaleattn import config as config_lib
from scaleattn.data import pipeline
from scaleattn.data import shapes

MEAN = np.array(config_lib.IMAGENET_MEAN, np.float32)
STD = np.array(config_lib.IMAGENET_STD, np.float32)
TRAIN, VAL = 16, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    pipeline.ensure_prepared(make_config(path))
    return path


def make_config(data_dir, **overrides):
    data = config_lib.base_config().data
    data.update(dict(name="scale_shapes", data_dir=str(data_dir),
                     train_split="train", eval_split="val", crop_size=64,
                     eval_size=160, prefetch=1, demo_train_size=TRAIN,
                     demo_val_size=VAL, augment_on="host"))
    data.update(overrides)
    return data


def identity(data_dir, **overrides):
    """No augmentation: scale 1, crop = image size, no flip."""
    return make_config(data_dir, **{**dict(scale_range=(1.0, 1.0),
                                           crop_size=128, flip=False),
                                    **overrides})


def normalized(image):
    return (image.astype(np.float32) - MEAN) / STD


def to_uint8(image):
    return np.rint(image * STD + MEAN).astype(np.uint8)


def reference(split, count):
    """{(image bytes, label bytes): index} of the generated examples."""
    return {tuple(a.tobytes() for a in shapes.generate_example(split, i)): i
            for i in range(count)}


def which(batch, known):
    """Indices of a batch's examples (None for one that is not known)."""
    return [known.get((to_uint8(image).tobytes(),
                       label.astype(np.uint8).tobytes()))
            for image, label in zip(batch["image"], batch["label"])]


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_ensure_prepared_builds_once(data_dir):
    builder = pipeline.get_builder(make_config(data_dir))
    assert builder.is_prepared()
    assert builder.builder_config.name == f"train{TRAIN}_val{VAL}"
    info_file = pathlib.Path(builder.data_path) / "dataset_info.json"
    stamp = info_file.stat().st_mtime_ns
    pipeline.ensure_prepared(make_config(data_dir))
    assert info_file.stat().st_mtime_ns == stamp
    assert pipeline.num_examples(make_config(data_dir), "train") == TRAIN
    assert pipeline.num_examples(make_config(data_dir), "val") == VAL


def test_unprepared_dataset_is_reported(tmp_path):
    with pytest.raises(pipeline.DatasetNotFoundError, match="ensure_prepared"):
        pipeline.train_batches(make_config(tmp_path), batch_size=2, ignore_label=255, seed=0,
                               process_index=0, process_count=1)


def test_voc_not_prepared_says_what_to_do(tmp_path):
    pytest.importorskip("scaleattn.data.voc")
    config = make_config(tmp_path, name="voc2012", manual_dir="/archives")
    with pytest.raises(pipeline.DatasetNotFoundError) as error:
        pipeline.ensure_prepared(config)
    message = str(error.value)
    for needle in (str(tmp_path), "VOCtrainval_11-May-2012.tar",
                   "benchmark.tgz", "/archives", "python -m scaleattn.data.build"):
        assert needle in message


def test_identity_augmentation_gives_each_image_once_per_epoch(data_dir):
    known = reference("train", TRAIN)
    batches = take(pipeline.train_batches(
        identity(data_dir), batch_size=4, ignore_label=255, seed=0, process_index=0,
        process_count=1), 8)
    assert batches[0]["image"].dtype == np.float32
    assert batches[0]["image"].shape == (4, 128, 128, 3)
    assert batches[0]["label"].dtype == np.int32
    assert batches[0]["label"].shape == (4, 128, 128)
    first = sum((which(b, known) for b in batches[:4]), [])
    second = sum((which(b, known) for b in batches[4:]), [])
    assert sorted(first) == sorted(second) == list(range(TRAIN))
    assert first != second, "epochs are reshuffled"
    # Normalisation is exactly (x - mean) / std.
    image, _ = shapes.generate_example("train", first[0])
    np.testing.assert_allclose(batches[0]["image"][0], normalized(image),
                               rtol=0, atol=1e-5)


def test_flip_moves_image_and_label_together(data_dir):
    known = reference("train", TRAIN)
    mirrored = {(to_uint8(normalized(image[:, ::-1])).tobytes(),
                 label[:, ::-1].tobytes()): i
                for (image, label), i in (
                    (shapes.generate_example("train", i), i)
                    for i in range(TRAIN))}
    batch = next(pipeline.train_batches(
        identity(data_dir, flip=True), batch_size=TRAIN, ignore_label=255, seed=1,
        process_index=0, process_count=1))
    plain, flipped = which(batch, known), which(batch, mirrored)
    assert all((p is None) != (f is None) for p, f in zip(plain, flipped))
    assert sorted(i for i in plain + flipped if i is not None) == list(
        range(TRAIN))
    assert 0 < sum(f is not None for f in flipped) < TRAIN


def test_downscale_pads_with_the_mean_and_ignore(data_dir):
    """Scale 0.5 of a 128 image into a 96 crop, checked against numpy."""
    known_labels = {}
    for i in range(TRAIN):
        image, label = shapes.generate_example("train", i)
        # Bilinear with half-pixel centres at exactly 1/2 = mean of 2x2 blocks;
        # nearest picks the pixel (2i + 1, 2j + 1).
        small = image.astype(np.float32).reshape(64, 2, 64, 2, 3).mean((1, 3))
        known_labels[label[1::2, 1::2].tobytes()] = normalized(small)
    config = make_config(data_dir, scale_range=(0.5, 0.5), crop_size=96,
                         flip=False)
    batch = next(pipeline.train_batches(config, batch_size=TRAIN, ignore_label=255, seed=2,
                                        process_index=0, process_count=1))
    offsets = set()
    for image, label in zip(batch["image"], batch["label"]):
        padded = np.all(image == 0, axis=-1)
        rows, cols = np.nonzero(~padded)
        top, left = rows.min(), cols.min()
        offsets.add((top, left))
        assert padded.sum() == 96 * 96 - 64 * 64
        assert (label[padded] == 255).all()
        window = (slice(top, top + 64), slice(left, left + 64))
        expected = known_labels[label[window].astype(np.uint8).tobytes()]
        np.testing.assert_allclose(image[window], expected, atol=1e-4)
    assert len(offsets) > 1, "the image lands at random places in the crop"


def test_augment_keeps_image_and_label_aligned():
    """Random scale / pad / crop / flip of a picture coloured by its label.

    Wherever the output label is c away from a boundary, the pixel must have
    colour(c); where the output is padding (image 0), the label must be 255.
    """
    colour = {0: (10, 200, 30), 1: (250, 20, 90), 2: (30, 60, 240),
              3: (200, 200, 0), 255: (90, 90, 90)}
    label = np.zeros((60, 80), np.uint8)
    label[5:25, 10:30] = 1
    label[30:55, 40:75] = 2
    label[8:20, 50:78] = 3
    label[40:50, 5:20] = 255
    image = np.zeros((60, 80, 3), np.uint8)
    for value, rgb in colour.items():
        image[label == value] = rgb
    checked = 0
    for k in range(24):
        out_image, out_label = pipeline.augment(
            tf.constant(image), tf.constant(label[..., None]),
            tf.constant([7, k], tf.int64), crop_size=64,
            scale_range=(0.5, 2.0), flip=True, mean=MEAN, std=STD,
            ignore_label=255)
        out_image, out_label = out_image.numpy(), out_label.numpy()
        assert out_image.shape == (64, 64, 3) and out_label.shape == (64, 64)
        pad = np.all(out_image == 0, axis=-1)
        assert (out_label[pad] == 255).all()
        rgb = out_image * STD + MEAN
        for value, expected in colour.items():
            inside = out_label == value
            # Interior: the whole 5x5 neighbourhood has this label.
            for dy, dx in itertools.product(range(-2, 3), repeat=2):
                inside &= np.roll(out_label, (dy, dx), (0, 1)) == value
            inside[:2] = inside[-2:] = False
            inside[:, :2] = inside[:, -2:] = False
            inside &= ~pad
            np.testing.assert_allclose(rgb[inside], np.broadcast_to(
                expected, rgb[inside].shape), atol=1e-3)
            checked += inside.sum()
    assert checked > 24 * 64 * 64 // 4


def test_stream_is_deterministic_and_resumes_exactly(data_dir):
    config = make_config(data_dir, scale_range=(0.5, 2.0))

    def stream(start_step, seed=0):
        return pipeline.train_batches(config, batch_size=3, ignore_label=255, seed=seed,
                                      start_step=start_step, process_index=0,
                                      process_count=1)

    fresh = take(stream(0), 9)          # 27 examples: crosses an epoch (16)
    again = take(stream(0), 9)
    for a, b in zip(fresh, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for start in (4, 7):                # mid-epoch, and in the second epoch
        for a, b in zip(take(stream(start), 9 - start), fresh[start:]):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    other = next(stream(0, seed=1))
    assert not np.array_equal(other["image"], fresh[0]["image"])
    labels = np.concatenate([b["label"] for b in fresh])
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}


def test_process_shards_are_disjoint_and_cover_the_split(data_dir):
    known = reference("train", TRAIN)
    seen = []
    for index, local in zip(range(3), (6, 5, 5)):   # 16 = 6 + 5 + 5
        batches = take(pipeline.train_batches(
            identity(data_dir), batch_size=local, ignore_label=255, seed=0,
            process_index=index, process_count=3), 2)
        first, second = (which(b, known) for b in batches)
        assert sorted(first) == sorted(second), "an epoch is the shard"
        seen.append(set(first))
        assert len(seen[-1]) == local
    assert set.union(*seen) == set(range(TRAIN))
    assert sum(map(len, seen)) == TRAIN


def check_eval_batch(batch, size, batch_size):
    assert batch["image"].shape == (batch_size, size, size, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (batch_size, size, size)
    assert batch["label"].dtype == np.int32


def test_eval_pads_images_and_the_last_batch(data_dir):
    known = reference("val", VAL)
    batches = list(pipeline.eval_batches(make_config(data_dir), batch_size=3, ignore_label=255,
                                         process_index=0, process_count=1))
    assert len(batches) == 3                         # 8 = 3 + 3 + 2 (+1 filler)
    found = []
    for batch in batches:
        check_eval_batch(batch, 160, 3)
        for image, label in zip(batch["image"], batch["label"]):
            outside = np.ones((160, 160), bool)
            outside[:128, :128] = False
            assert (label[outside] == 255).all()
            assert (image[outside] == 0).all()
            if (label == 255).all():                 # a filler example
                assert (image == 0).all()
                found.append(None)
                continue
            found += which({"image": image[None, :128, :128],
                            "label": label[None, :128, :128]}, known)
    assert sorted(i for i in found if i is not None) == list(range(VAL))
    assert found[VAL:] == [None]


def test_eval_shards_have_equal_batch_counts(data_dir):
    known = reference("val", VAL)
    seen, counts = [], []
    for index in range(3):                           # 8 = 3 + 3 + 2
        batches = list(pipeline.eval_batches(
            make_config(data_dir, eval_size=128), batch_size=2, ignore_label=255,
            process_index=index, process_count=3))
        counts.append(len(batches))
        ids = sum((which(b, known) for b in batches), [])
        for b in batches:
            check_eval_batch(b, 128, 2)
        seen.append({i for i in ids if i is not None})
    assert counts == [2, 2, 2]
    assert set.union(*seen) == set(range(VAL))
    assert sum(map(len, seen)) == VAL


def test_eval_defaults_to_the_jax_process(data_dir):
    batches = list(pipeline.eval_batches(make_config(data_dir), batch_size=4,
                                         ignore_label=255))
    assert len(batches) == 2


def test_eval_image_larger_than_eval_size_is_an_error(data_dir):
    with pytest.raises(ValueError, match="eval_size=100"):
        list(pipeline.eval_batches(make_config(data_dir, eval_size=100),
                                   batch_size=2, ignore_label=255, process_index=0,
                                   process_count=1))


# ------------------------------------------------- device augmentation input ---


def test_device_path_puts_decoded_images_on_the_canvas(data_dir):
    known = reference("train", TRAIN)
    config = make_config(data_dir, augment_on="device", canvas_size=150)
    batches = take(pipeline.train_batches(config, batch_size=4, ignore_label=255, seed=0,
                                          process_index=0, process_count=1), 4)
    assert batches[0]["image"].dtype == np.uint8
    assert batches[0]["image"].shape == (4, 150, 150, 3)
    assert batches[0]["label"].dtype == np.uint8
    assert batches[0]["label"].shape == (4, 150, 150)
    assert batches[0]["size"].dtype == np.int32
    found = []
    for batch in batches:
        np.testing.assert_array_equal(batch["size"], np.full((4, 2), 128))
        for image, label in zip(batch["image"], batch["label"]):
            outside = np.ones((150, 150), bool)
            outside[:128, :128] = False
            assert (label[outside] == 255).all() and (image[outside] == 0).all()
            found.append(known.get((image[:128, :128].tobytes(),
                                    label[:128, :128].tobytes())))
    assert sorted(found) == list(range(TRAIN)), "each decoded image once, unchanged"
    # The canvas defaults to data.eval_size.
    batch = next(pipeline.train_batches(make_config(data_dir, augment_on="device"),
                                        batch_size=2, ignore_label=255, seed=0,
                                        process_index=0, process_count=1))
    assert batch["image"].shape == (2, 160, 160, 3)


def test_image_larger_than_the_canvas_is_an_error(data_dir):
    config = make_config(data_dir, augment_on="device", canvas_size=100)
    with pytest.raises(ValueError, match=r"data\.canvas_size=100"):
        next(pipeline.train_batches(config, batch_size=2, ignore_label=255, seed=0,
                                    process_index=0, process_count=1))


def test_configured_ignore_label_marks_boundaries_and_padding(data_dir):
    """loss.ignore_label=254: the files' 255 becomes 254, padding is 254, no 255 left."""
    train_labels = {lab.tobytes(): lab for _, lab in
                    (shapes.generate_example("train", i) for i in range(TRAIN))}
    val_labels = {i: shapes.generate_example("val", i)[1] for i in range(VAL)}

    def check(label, source, window):
        assert (label != 255).all()
        inside = label[window]
        expected = np.where(source == 255, 254, source)
        np.testing.assert_array_equal(inside, expected)
        outside = np.ones(label.shape, bool)
        outside[window] = False
        assert (label[outside] == 254).all()

    as_255 = {np.where(lab == 255, 254, lab).tobytes(): lab for lab in train_labels.values()}
    window = (slice(0, 128), slice(0, 128))
    # Eval: padded to 160.
    batches = list(pipeline.eval_batches(make_config(data_dir), batch_size=4, ignore_label=254,
                                         process_index=0, process_count=1))
    labels = np.concatenate([b["label"] for b in batches])
    assert len(labels) == VAL
    for label in labels:
        source = next(v for v in val_labels.values()
                      if np.array_equal(np.where(v == 255, 254, v), label[window]))
        check(label, source, window)
    assert any((lab == 255).any() for lab in val_labels.values())
    # Host augmentation: an image smaller than the crop is padded.
    config = make_config(data_dir, scale_range=(0.5, 0.5), crop_size=96, flip=False)
    batch = next(pipeline.train_batches(config, batch_size=4, ignore_label=254, seed=0,
                                        process_index=0, process_count=1))
    for label in batch["label"]:
        assert (label != 255).all() and (label == 254).sum() >= 96 * 96 - 64 * 64
    # Device path: the canvas.
    config = make_config(data_dir, augment_on="device")
    batch = next(pipeline.train_batches(config, batch_size=4, ignore_label=254, seed=0,
                                        process_index=0, process_count=1))
    for label in batch["label"]:
        check(label, as_255[label[window].tobytes()], window)
