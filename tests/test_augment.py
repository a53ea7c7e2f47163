"""Device augmentation (`scaleattn.augment`) against numpy, across device splits, on resume."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaleattn import augment, parallel
from scaleattn import config as config_lib
from scaleattn.data import pipeline

MEAN = np.array((120.0, 110.0, 100.0), np.float32)
STD = np.array((60.0, 55.0, 50.0), np.float32)
IGNORE = 250
CANVAS = 24


# ------------------------------------------------------------ numpy reference ---


def np_taps(n_out: int, n_in: int):
    """Half-pixel bilinear taps (lower, upper, weight of upper), float32 like TF."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(src)
    lower = np.clip(floor.astype(np.int64), 0, n_in - 1)
    upper = np.clip(np.ceil(src).astype(np.int64), 0, n_in - 1)
    return lower, upper, (src - floor).astype(np.float32)


def np_resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[h, w, C] -> [out_h, out_w, C] float32, half-pixel centres, no antialiasing."""
    image = image.astype(np.float32)
    y0, y1, wy = np_taps(out_h, image.shape[0])
    x0, x1, wx = np_taps(out_w, image.shape[1])
    wx = wx[None, :, None]
    top = image[y0][:, x0] + (image[y0][:, x1] - image[y0][:, x0]) * wx
    bottom = image[y1][:, x0] + (image[y1][:, x1] - image[y1][:, x0]) * wx
    return top + (bottom - top) * wy[:, None, None]


def np_resize_nearest(label: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    def rows(n_out, n_in):
        scale = np.float32(n_in) / np.float32(n_out)
        src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale
        return np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    return label[rows(out_h, label.shape[0])][:, rows(out_w, label.shape[1])]


def np_augment(image, label, resized, offset, corner, flip, crop):
    """Rescale to ``resized``, pad to the crop at ``offset``, crop at ``corner``, flip:
    the host recipe written out in numpy for one fixed draw."""
    rh, rw = resized
    small = (np_resize_bilinear(image, rh, rw) - MEAN) / STD
    small_label = np_resize_nearest(label, rh, rw).astype(np.int32)
    ph, pw = max(rh, crop), max(rw, crop)
    padded = np.zeros((ph, pw, 3), np.float32)
    padded_label = np.full((ph, pw), IGNORE, np.int32)
    top, left = offset
    padded[top:top + rh, left:left + rw] = small
    padded_label[top:top + rh, left:left + rw] = small_label
    y0, x0 = corner
    out, out_label = padded[y0:y0 + crop, x0:x0 + crop], padded_label[y0:y0 + crop, x0:x0 + crop]
    if flip:
        out, out_label = out[:, ::-1], out_label[:, ::-1]
    return out, out_label


def random_example(rng, h, w, classes=(0, 3, 7)):
    """A canvas with an ``h x w`` image / label in its top-left corner; the rest holds
    values the output must never show (label 9, bright pixels)."""
    canvas = np.full((CANVAS, CANVAS, 3), 255, np.uint8)
    canvas_label = np.full((CANVAS, CANVAS), 9, np.uint8)
    canvas[:h, :w] = rng.integers(0, 256, (h, w, 3))
    canvas_label[:h, :w] = rng.choice(classes, (h, w))
    return canvas, canvas_label, np.array([h, w], np.int32)


def canvas_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    examples = [random_example(rng, int(rng.integers(5, CANVAS + 1)),
                               int(rng.integers(5, CANVAS + 1))) for _ in range(n)]
    return {k: np.stack([e[i] for e in examples]) for i, k in enumerate(("image", "label", "size"))}


SETTINGS = dict(crop_size=16, scale_range=(0.5, 2.0), flip=True, mean=tuple(MEAN),
                std=tuple(STD), ignore_label=IGNORE)


def one(image, label, size, key, **overrides):
    settings = {**SETTINGS, **overrides}
    choice = augment.draw(key, jnp.asarray(size), crop_size=settings["crop_size"],
                          scale_range=settings["scale_range"], flip=settings["flip"])
    out = augment.apply(jnp.asarray(image), jnp.asarray(label), jnp.asarray(size), choice,
                        crop_size=settings["crop_size"], mean=settings["mean"],
                        std=settings["std"], ignore_label=settings["ignore_label"])
    return jax.device_get(choice), np.asarray(out[0]), np.asarray(out[1])


# --------------------------------------------------------------------- tests ---


@pytest.mark.parametrize("size,out", [((7, 11), (13, 5)), ((12, 9), (6, 4)), ((10, 10), (10, 10))])
def test_numpy_reference_resize_is_tensorflows(size, out):
    """The reference above is what the host pipeline's ``tf.image.resize`` computes."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    label = rng.integers(0, 21, size + (1,), dtype=np.uint8)
    expected = tf.image.resize(tf.cast(image, tf.float32), out, "bilinear").numpy()
    np.testing.assert_allclose(np_resize_bilinear(image, *out), expected, atol=1e-3)
    expected = tf.image.resize(label, out, "nearest").numpy()[..., 0]
    np.testing.assert_array_equal(np_resize_nearest(label[..., 0], *out), expected)


def test_one_draw_matches_numpy_rescale_crop_flip():
    rng = np.random.default_rng(0)
    seen_flip, seen_small, seen_large = set(), False, False
    for k in range(12):
        h, w = int(rng.integers(6, CANVAS + 1)), int(rng.integers(6, CANVAS + 1))
        image, label, size = random_example(rng, h, w)
        choice, out, out_label = one(image, label, size, jax.random.PRNGKey(k))
        resized = tuple(int(v) for v in choice.resized)
        for side, new in zip((h, w), resized):  # s in [0.5, 2], rounded
            assert max(1, round(0.5 * side) - 1) <= new <= round(2.0 * side) + 1
        expected, expected_label = np_augment(
            image[:h, :w], label[:h, :w], resized, tuple(int(v) for v in choice.offset),
            tuple(int(v) for v in choice.corner), bool(choice.flip), 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.float32
        assert out_label.shape == (16, 16) and out_label.dtype == np.int32
        np.testing.assert_allclose(out, expected, atol=2e-5)
        np.testing.assert_array_equal(out_label, expected_label)
        seen_flip.add(bool(choice.flip))
        seen_small |= min(resized) < 16
        seen_large |= max(resized) > 16
    assert seen_flip == {False, True} and seen_small and seen_large


def test_scale_one_without_flip_is_a_plain_crop():
    rng = np.random.default_rng(2)
    image, label, size = random_example(rng, 20, 23)
    corners = set()
    for k in range(10):
        choice, out, out_label = one(image, label, size, jax.random.PRNGKey(k),
                                     scale_range=(1.0, 1.0), flip=False)
        y0, x0 = (int(v) for v in choice.corner)
        corners.add((y0, x0))
        assert tuple(choice.resized) == (20, 23) and tuple(choice.offset) == (0, 0)
        assert 0 <= y0 <= 20 - 16 and 0 <= x0 <= 23 - 16
        window = (slice(y0, y0 + 16), slice(x0, x0 + 16))
        np.testing.assert_allclose(out, (image[window].astype(np.float32) - MEAN) / STD,
                                   rtol=0, atol=1e-6)
        np.testing.assert_array_equal(out_label, label[window])
    assert len(corners) > 3


def test_small_image_lands_at_a_random_offset_with_mean_and_ignore_padding():
    rng = np.random.default_rng(3)
    image, label, size = random_example(rng, 9, 7)
    offsets = set()
    for k in range(10):
        choice, out, out_label = one(image, label, size, jax.random.PRNGKey(k),
                                     scale_range=(1.0, 1.0), flip=False)
        top, left = (int(v) for v in choice.offset)
        offsets.add((top, left))
        assert tuple(choice.corner) == (0, 0)
        inside = np.zeros((16, 16), bool)
        inside[top:top + 9, left:left + 7] = True
        assert np.all(out[~inside] == 0) and np.all(out_label[~inside] == IGNORE)
        np.testing.assert_array_equal(out_label[inside].reshape(9, 7), label[:9, :7])
    assert len(offsets) > 3


def test_labels_only_take_source_values_or_ignore():
    rng = np.random.default_rng(4)
    values = set()
    for k in range(16):
        image, label, size = random_example(rng, int(rng.integers(3, CANVAS + 1)),
                                            int(rng.integers(3, CANVAS + 1)))
        _, out, out_label = one(image, label, size, jax.random.PRNGKey(k),
                                scale_range=(0.3, 2.5))
        values |= set(np.unique(out_label).tolist())
        assert np.all(out[out_label == IGNORE] == 0)
    assert values <= {0, 3, 7, IGNORE}    # never the canvas filler 9
    assert {0, 3, 7, IGNORE} <= values


def test_flip_mirrors_image_and_label_together_half_of_the_time():
    rng = np.random.default_rng(5)
    image, label, size = random_example(rng, 18, 21)
    choice, _, _ = one(image, label, size, jax.random.PRNGKey(0))
    kwargs = dict(crop_size=16, mean=tuple(MEAN), std=tuple(STD), ignore_label=IGNORE)
    plain = augment.apply(image, label, size, choice._replace(flip=jnp.array(False)), **kwargs)
    mirrored = augment.apply(image, label, size, choice._replace(flip=jnp.array(True)), **kwargs)
    np.testing.assert_array_equal(np.asarray(mirrored[0]), np.asarray(plain[0])[:, ::-1])
    np.testing.assert_array_equal(np.asarray(mirrored[1]), np.asarray(plain[1])[:, ::-1])
    keys = jax.random.split(jax.random.PRNGKey(1), 400)
    flips = jax.vmap(lambda k: augment.draw(k, jnp.array([18, 21]), crop_size=16,
                                            scale_range=(0.5, 2.0), flip=True).flip)(keys)
    assert 160 <= int(np.sum(flips)) <= 240      # p = 1/2: mean 200, std 10
    never = jax.vmap(lambda k: augment.draw(k, jnp.array([18, 21]), crop_size=16,
                                            scale_range=(0.5, 2.0), flip=False).flip)(keys)
    assert not np.any(never)


def jit_augment(batch, rng, step):
    fn = jax.jit(lambda b, r, s: augment.train_augment(b, r, s, parallel.SINGLE, **SETTINGS))
    return jax.device_get(fn(batch, rng, step))


def pmap_augment(batch, rng, step, devices):
    fn = jax.pmap(lambda b, r, s: augment.train_augment(b, r, s, parallel.Replicas("batch"),
                                                        **SETTINGS),
                  axis_name="batch", in_axes=(0, None, None), devices=devices)
    n = len(devices)
    split = {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}
    out = jax.device_get(fn(split, rng, step))
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in out.items()}


def sharded_augment(batch, rng, step):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    put = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    return jit_augment(put, rng, step)


def test_crops_depend_on_key_and_step_not_on_the_device_split():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
    batch, rng = canvas_batch(8), jax.random.PRNGKey(3)
    reference = jit_augment(batch, rng, 5)
    assert reference["image"].shape == (8, 16, 16, 3)
    results = {"jit again": jit_augment(batch, rng, 5),
               "pmap 8": pmap_augment(batch, rng, 5, jax.devices()[:8]),
               "pmap 4": pmap_augment(batch, rng, 5, jax.devices()[:4]),
               "sharded 8": sharded_augment(batch, rng, 5)}
    for name, result in results.items():
        for key in ("image", "label"):
            np.testing.assert_array_equal(result[key], reference[key], err_msg=name)
    other_step = jit_augment(batch, rng, 6)
    assert not np.array_equal(other_step["label"], reference["label"])
    # Examples are keyed by their own index: identical inputs give different crops.
    same = {k: np.repeat(v[:1], 8, axis=0) for k, v in batch.items()}
    crops = jit_augment(same, rng, 5)["image"]
    assert len({c.tobytes() for c in crops}) == 8


def test_train_step_augments_canvas_batches_and_passes_crops_through():
    """The step applies ``augment`` to a canvas batch (keyed by ``state.step``) and
    hands a cropped batch to the model unchanged."""
    seen = []

    class Model:
        def apply(self, variables, images, **kwargs):
            seen.append(images)
            raise StopTrace

    class StopTrace(Exception):
        pass

    from scaleattn import steps  # pylint: disable=import-outside-toplevel

    class State:
        step, params, batch_stats = jnp.int32(4), {}, {}

    batch, rng = canvas_batch(4), jax.random.PRNGKey(0)
    fn = augment.from_config(tiny_config())
    with pytest.raises(StopTrace):
        steps.train_step(State, batch, rng, model=Model(), loss_config=None,
                         learning_rate=None, augment=fn)
    expected = fn(batch, rng, 4, parallel.SINGLE)["image"]
    np.testing.assert_array_equal(np.asarray(seen[-1]), np.asarray(expected))
    crops = {"image": np.random.default_rng(0).standard_normal((4, 16, 16, 3), np.float32)}
    with pytest.raises(StopTrace):
        steps.train_step(State, crops, rng, model=Model(), loss_config=None,
                         learning_rate=None, augment=fn)
    np.testing.assert_array_equal(np.asarray(seen[-1]), crops["image"])
    with pytest.raises(ValueError, match="augment_on='device'"):
        steps.train_step(State, batch, rng, model=Model(), loss_config=None,
                         learning_rate=None)


def tiny_config(**data):
    config = config_lib.base_config()
    config.data.update(dict(crop_size=16, scale_range=(0.5, 2.0), flip=True, mean=tuple(MEAN),
                            std=tuple(STD), **data))
    config.loss.ignore_label = IGNORE
    return config


def test_from_config():
    assert augment.from_config(tiny_config(augment_on="host")) is None
    fn = augment.from_config(tiny_config(augment_on="device"))
    assert fn.keywords == dict(SETTINGS, scale_set=())
    with pytest.raises(config_lib.ConfigError, match="data.augment_on"):
        augment.from_config(tiny_config(augment_on="gpu"))


def test_a_resumed_run_sees_the_same_augmented_batches(tmp_path):
    """Host stream resumed at step k (`train_batches(start_step=k)`) + the step's
    augmentation at step k = the uninterrupted run's batch k."""
    data = config_lib.base_config().data
    data.update(dict(name="scale_shapes", data_dir=str(tmp_path), train_split="train",
                     eval_split="val", crop_size=16, eval_size=128, scale_range=(0.5, 2.0),
                     prefetch=1, demo_train_size=6, demo_val_size=2, augment_on="device"))
    pipeline.ensure_prepared(data)
    settings = dict(SETTINGS, ignore_label=255)
    rng = jax.random.PRNGKey(7)

    def stream(start):
        return pipeline.train_batches(data, batch_size=4, seed=0, ignore_label=255,
                                      start_step=start, process_index=0, process_count=1)

    def crops(batch, step):
        return jax.device_get(augment.train_augment(batch, rng, step, parallel.SINGLE,
                                                    **settings))

    fresh = [crops(b, step) for step, b in enumerate(itertools.islice(stream(0), 4))]
    for start in (1, 3):
        resumed = crops(next(stream(start)), start)
        for key in ("image", "label"):
            np.testing.assert_array_equal(resumed[key], fresh[start][key])
    assert not np.array_equal(fresh[1]["image"], fresh[3]["image"])


# ------------------------------------------------------------ discrete rescale ---

SCALE_SET = (0.5, 0.75, 1.0, 1.25, 1.5)   # DeepLab-v2's "+Aug" scales


def test_scale_set_draws_each_scale_uniformly_on_the_device():
    """``scale_set``: every resized size is the image's times one of the set, each scale
    drawn about equally often, the same draw for the same key."""
    size = np.array([40, 36], np.int32)
    expected = {tuple(int(round(s * n)) for n in size): s for s in SCALE_SET}
    keys = jax.random.split(jax.random.PRNGKey(3), 500)

    def resized(key):
        return augment.draw(key, jnp.asarray(size), crop_size=16, scale_range=(0.5, 2.0),
                            flip=True, scale_set=SCALE_SET).resized
    sizes = [tuple(r) for r in np.asarray(jax.jit(jax.vmap(resized))(keys))]
    counts = {s: 0 for s in SCALE_SET}
    for r in sizes:
        counts[expected[r]] += 1                    # KeyError: a size off the set
    assert all(60 <= n <= 140 for n in counts.values()), counts   # mean 100, std 9
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(resized))(keys)), sizes)


def test_scale_set_draws_each_scale_uniformly_on_the_host():
    image = tf.zeros((40, 36, 3), tf.uint8)
    label = tf.zeros((40, 36, 1), tf.uint8)
    expected = {(int(round(s * 40)), int(round(s * 36))): s for s in SCALE_SET}
    counts = {s: 0 for s in SCALE_SET}
    for k in range(250):
        out, _ = pipeline.rescale(image, label, tf.constant([5, k], tf.int64),
                                  scale_range=(0.5, 2.0), scale_set=SCALE_SET)
        again, _ = pipeline.rescale(image, label, tf.constant([5, k], tf.int64),
                                    scale_range=(0.5, 2.0), scale_set=SCALE_SET)
        assert out.shape == again.shape
        counts[expected[tuple(out.shape[:2])]] += 1
    assert all(25 <= n <= 75 for n in counts.values()), counts    # mean 50, std 6


def test_scale_set_reaches_the_train_step_and_is_checked():
    config = config_lib.recipe("voc_r101")
    assert tuple(config.data.scale_set) == SCALE_SET
    config.data.augment_on = "device"
    assert augment.from_config(config).keywords["scale_set"] == SCALE_SET
    config.data.scale_set = (0.5, 0.0)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.scale_set"):
        config_lib.validate(config)


def test_augmentation_compiled_for_a_tpu_moves_little_more_than_its_inputs_and_outputs():
    """XLA:TPU's own count for 8 VOC-sized canvases (512²) to 321² crops on a v5e: bytes
    accessed within 20x of the uint8 canvases in plus the float32 crops and int32 labels
    out (the products count ~6x: the row pass's [321, 512, 3] float32 intermediate and
    the weight matrices; a gather of single pixels, this module's first form, counted
    540x at 4 images and 5,500x at 8), and linear in the batch."""
    from benchmarks import augment_cost  # pylint: disable=import-outside-toplevel
    counted = {}
    for n in (4, 8):
        cost = augment_cost.cost("v5e:2x2", n, canvas=512, crop=321)
        counted[n], inputs_and_outputs = cost["bytes_accessed"], cost["in_out_bytes"]
        assert inputs_and_outputs == n * (512 * 512 * 4 + 321 * 321 * (3 * 4 + 4))
        assert counted[n] < 20 * inputs_and_outputs, (n, counted[n], inputs_and_outputs)
    assert 1.5 < counted[8] / counted[4] < 2.5, counted
