"""The `scale_shapes` demo dataset: what it contains and how it is built."""
import io
import pathlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
import tensorflow_datasets as tfds

from scaleattn.data import shapes

TINY = dict(train_size=16, val_size=8)
NO_GCS = tfds.download.DownloadConfig(try_download_gcs=False)


def build(data_dir, **sizes) -> shapes.ScaleShapes:
    builder = shapes.ScaleShapes(data_dir=str(data_dir),
                                 config=shapes.shapes_config(**sizes))
    builder.download_and_prepare(download_config=NO_GCS)
    return builder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("shapes"), **TINY)


def read_all(builder, split):
    """{image_id: example} with the stored bytes of image / segmentation too."""
    decoded = {ex["image_id"].decode(): ex for ex in tfds.as_numpy(
        builder.as_dataset(split=split, shuffle_files=False))}
    raw = tfds.as_numpy(builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding(),
                  "segmentation": tfds.decode.SkipDecoding()}))
    for ex in raw:
        decoded[ex["image_id"].decode()]["png"] = ex["segmentation"]
    return decoded


def record_files(builder):
    return sorted(pathlib.Path(builder.data_path).glob("*.tfrecord*"))


def test_features_match_the_voc_contract(tiny):
    features = tiny.info.features
    assert features["image"].shape == (None, None, 3)
    assert features["image"].np_dtype == np.uint8
    assert features["segmentation"].shape == (None, None, 1)
    assert features["segmentation"].np_dtype == np.uint8
    assert isinstance(features["image_id"], tfds.features.Text)
    assert tiny.info.splits["train"].num_examples == 16
    assert tiny.info.splits["val"].num_examples == 8


def test_stored_examples_are_the_generator_output(tiny):
    for split, count in (("train", 16), ("val", 8)):
        examples = read_all(tiny, split)
        assert sorted(examples) == [f"{split}_{i:05d}" for i in range(count)]
        for i in range(count):
            ex = examples[f"{split}_{i:05d}"]
            image, label = shapes.generate_example(split, i)
            assert image.shape == (128, 128, 3) and label.shape == (128, 128)
            np.testing.assert_array_equal(ex["image"], image)
            np.testing.assert_array_equal(ex["segmentation"][..., 0], label)


def test_masks_are_grayscale_pngs_of_class_indices(tiny):
    """TFDS decodes them to indices because they are not palette images."""
    for image_id, ex in read_all(tiny, "val").items():
        png = ex["png"]
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png[25] == 0, "IHDR colour type 0 = grayscale"
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.array(im),
                                          ex["segmentation"][..., 0])
        assert 255 in ex["segmentation"], image_id


def test_rebuild_is_byte_identical(tiny, tmp_path):
    again = build(tmp_path, **TINY)
    files, files_again = record_files(tiny), record_files(again)
    assert [f.name for f in files] == [f.name for f in files_again]
    assert len(files) == 2
    for a, b in zip(files, files_again):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_examples_are_pure_functions_of_split_and_index():
    a_image, a_label = shapes.generate_example("train", 3)
    b_image, b_label = shapes.generate_example("train", 3)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_label, b_label)
    other, _ = shapes.generate_example("val", 3)
    assert not np.array_equal(a_image, other)


def test_tiny_config_does_not_clash_with_the_default(tiny):
    assert shapes.shapes_config() is shapes.DEFAULT_CONFIG
    assert shapes.shapes_config(0, 0) is shapes.DEFAULT_CONFIG
    assert shapes.shapes_config(2000, 300) is shapes.DEFAULT_CONFIG
    assert tiny.builder_config.name == "train16_val8"
    default = shapes.ScaleShapes(data_dir=tiny.data_dir_root)
    assert default.data_path != tiny.data_path
    assert not default.is_prepared()


def test_label_values_and_ignore_band():
    for i in range(60):
        _, label = shapes.generate_example("val", i)
        assert set(np.unique(label)) <= {0, 1, 2, 3, 255}
        assert (label == 255).any()
        # The 255 band separates every object from everything else: no pixel
        # of a class touches (8-neighbourhood) background or another class.
        padded = np.pad(label, 1, constant_values=255)
        is_class = (label != 0) & (label != 255)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                neighbour = padded[1 + dy:129 + dy, 1 + dx:129 + dx]
                touching = is_class & (neighbour != label) & (neighbour != 255)
                assert not touching.any(), (i, dy, dx)
        # ... and it is thin: a 3x3 erosion of it leaves little (corners).
        band = label == 255
        assert shapes.erode(band)[1:-1, 1:-1].sum() < 0.1 * band.sum()


def test_objects_are_whole_and_apart():
    """Every object lies wholly inside the image, no two touch, and the labels show
    one connected part per object, of one class."""
    size, pad = shapes.IMAGE_SIZE, 64
    grid = np.arange(-pad, size + pad)
    counts = []
    for i in range(80):
        rng = shapes.example_rng("train", i)
        objects = shapes.sample_objects(rng, size, shapes.draw_background(rng, size))
        masks = [shapes.shape_mask(o.label, o.radius, o.angle, *np.broadcast_arrays(
            grid[:, None] - o.cy, grid[None, :] - o.cx)) for o in objects]
        for o, mask in zip(objects, masks):
            inside = mask[pad:pad + size, pad:pad + size]
            assert inside.sum() == mask.sum() > 0, (i, o.label, o.radius)
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                assert not (shapes.dilate(masks[a]) & shapes.dilate(masks[b])).any(), (i, a, b)
        _, label = shapes.generate_example("train", i)
        parts, n = ndimage.label(label != 0, structure=np.ones((3, 3)))
        assert n == len(objects), (i, n, len(objects))
        for k in range(1, n + 1):
            assert len(set(np.unique(label[parts == k])) - {255}) == 1, (i, k)
        counts.append(len(objects))
    assert min(counts) == 1 and max(counts) == shapes.MAX_OBJECTS  # room for 4 happens


def test_object_sizes_span_16x():
    """Over the default val split, measured from the labels.

    A connected part of `label != 0` holds whole objects only, so the smallest
    such part bounds the smallest object from above (its non-band pixels
    contain the interior of the object drawn last). A connected part of one
    class is a visible piece of one object (bands split overlapping objects),
    so the largest bounds the largest object from below.
    """
    smallest, largest = np.inf, 0
    for i in range(shapes.VAL_SIZE):
        _, label = shapes.generate_example("val", i)
        parts, _ = ndimage.label(label != 0, structure=np.ones((3, 3)))
        for k, box in enumerate(ndimage.find_objects(parts), 1):
            ys, xs = np.nonzero((parts[box] == k) & (label[box] != 255))
            assert len(ys), f"val {i}: an object is all band"
            smallest = min(smallest, max(np.ptp(ys), np.ptp(xs)) + 1)
        for c in (1, 2, 3):
            pieces, _ = ndimage.label(label == c)
            for box in ndimage.find_objects(pieces):
                largest = max(largest, max(s.stop - s.start for s in box))
    assert largest / smallest >= 16, (smallest, largest)


def test_every_class_occurs_at_every_scale():
    """Classes are not told apart by size: each has small and large objects."""
    sizes = {c: [] for c in (1, 2, 3)}
    for i in range(100):
        _, label = shapes.generate_example("train", i)
        for c in sizes:
            pieces, _ = ndimage.label(label == c)
            sizes[c] += [max(s.stop - s.start for s in box)
                         for box in ndimage.find_objects(pieces)]
    for c, extents in sizes.items():
        assert min(extents) <= 8 and max(extents) >= 64, (c, min(extents),
                                                          max(extents))


class _FailingShapes(shapes.ScaleShapes, skip_registration=True):
    """scale_shapes whose generation dies half-way (a full disk, a kill)."""

    name = "scale_shapes"

    def _generate_examples(self, split, count):
        for i, example in enumerate(super()._generate_examples(split, count)):
            if i == 5:
                raise OSError("simulated failure")
            yield example


def test_failed_build_leaves_nothing_a_rerun_would_use(tmp_path):
    failing = _FailingShapes(data_dir=str(tmp_path),
                             config=shapes.shapes_config(**TINY))
    with pytest.raises(OSError, match="simulated failure"):
        failing.download_and_prepare(download_config=NO_GCS)
    assert not failing.is_prepared()
    assert not pathlib.Path(failing.data_path).exists()
    assert not list(tmp_path.rglob("*incomplete*"))
    rebuilt = build(tmp_path, **TINY)
    assert rebuilt.is_prepared()
    assert rebuilt.info.splits["train"].num_examples == 16
