"""Prediction pictures: the VOC palette, overlays, heat maps, files from a checkpoint,
and multi-scale + flip inference."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from scaleattn import checkpoint, experiment, inference, predict, viz
from scaleattn import config as config_lib


def test_voc_palette():
    palette = viz.voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[:5], [[0, 0, 0], [128, 0, 0], [0, 128, 0],
                                                [128, 128, 0], [0, 0, 128]])
    np.testing.assert_array_equal(palette[15], [192, 128, 128])   # person
    np.testing.assert_array_equal(palette[255], [224, 224, 192])  # ignore / border


def test_mask_png_is_a_palette_image_whose_index_is_the_class(tmp_path):
    mask = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
    viz.mask_image(mask).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.array(image), mask)
        assert image.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]


def test_overlay_tints_objects_only():
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 255], [2, 0, 0]])
    out = viz.overlay(image, mask, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])   # background
    np.testing.assert_array_equal(out[0, 2], [100, 100, 100])   # ignore
    np.testing.assert_array_equal(out[0, 1], [114, 50, 50])     # (100 + (128, 0, 0)) / 2
    np.testing.assert_array_equal(out[1, 0], [50, 114, 50])


def test_heatmap_and_rgb_composite():
    weights = np.array([[0.0, 1.0], [0.5, 2.0]])
    heat = viz.heatmap(weights)
    assert heat.shape == (2, 2, 3) and heat.dtype == np.uint8
    np.testing.assert_array_equal(heat[0, 0], [0, 0, 4])
    np.testing.assert_array_equal(heat[0, 1], [252, 255, 164])
    np.testing.assert_array_equal(heat[1, 1], heat[0, 1])       # clipped to 1
    attention = np.array([[[1.0, 0.0], [0.25, 0.75]]])          # [1, 2, S=2]
    np.testing.assert_array_equal(viz.attention_rgb(attention),
                                  [[[255, 0, 0], [64, 191, 0]]])
    with pytest.raises(ValueError, match="at most 3"):
        viz.attention_rgb(np.zeros((1, 1, 4)))


def tiny_config():
    c = config_lib.recipe("demo")
    c.model.width, c.model.fc_width = 1 / 16, 32
    c.data.crop_size, c.data.eval_size = 24, 40
    c.parallel.mode = "jit"
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a step-0 checkpoint of a tiny attention model."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    run = experiment.setup_run(config)
    rng = jax.random.PRNGKey(config.seed)
    state = experiment.initial_state(run, rng)
    manager = checkpoint.make_manager(workdir, 1, training=True)
    checkpoint.save(manager, 0, state, rng, config)
    manager.wait_until_finished()
    return config, workdir, run, state, inference.Predictor(run.model)


def test_predict_files_writes_masks_overlays_and_heat_maps(trained, tmp_path):
    config, workdir = trained[:2]
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 37, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 40, 3), np.uint8)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "c.png"
    Image.fromarray(rng.integers(0, 255, (45, 16, 3), np.uint8)).convert("L").save(single)
    out = tmp_path / "out"
    written = predict.predict_files(config, workdir, [str(folder), str(single)], str(out))
    names = sorted(os.path.basename(p) for p in written)
    per_image = ["mask", "overlay", "attention_0_x1", "attention_1_x0.5", "attention_rgb"]
    assert names == sorted(f"{stem}_{kind}.png" for stem in "abc" for kind in per_image)
    for stem, (h, w) in {"a": (30, 37), "b": (20, 40), "c": (45, 16)}.items():
        with Image.open(out / f"{stem}_mask.png") as mask:
            assert mask.mode == "P" and mask.size == (w, h)
            assert np.array(mask).max() < config.model.num_classes
            assert mask.getpalette()[:12] == viz.PALETTE[:4].reshape(-1).tolist()
        for kind in per_image[1:]:
            with Image.open(out / f"{stem}_{kind}.png") as picture:
                assert picture.mode == "RGB" and picture.size == (w, h)


def test_predict_without_checkpoint_or_images_is_a_clear_error(trained, tmp_path):
    config = trained[0]
    with pytest.raises(predict.InputError, match="no image files"):
        predict.list_images([str(tmp_path)])
    with pytest.raises(predict.InputError, match="no such file"):
        predict.list_images([str(tmp_path / "missing.png")])
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        predict.predict_files(config, str(tmp_path / "empty"), [str(tmp_path)], str(tmp_path))


def test_attention_weights_sum_to_one_at_the_input_size(trained):
    _, _, _, state, predictor = trained
    images = np.random.default_rng(1).standard_normal((1, 40, 40, 3)).astype(np.float32)
    out = predictor(state, images)
    assert out["probs"].shape == (1, 40, 40, 4) and out["prediction"].shape == (1, 40, 40)
    assert out["attention"].shape == (1, 40, 40, 2)
    np.testing.assert_allclose(out["attention"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["prediction"], out["probs"].argmax(-1))


def test_ms_flip_averages_mirrored_and_rescaled_predictions(trained):
    _, _, run, state, predictor = trained
    images = np.random.default_rng(2).standard_normal((1, 40, 40, 3)).astype(np.float32)
    flipped = inference.ms_flip_probs(state, images, model=run.model, scales=(1.0,), flip=True)
    plain = predictor(state, images)["probs"]
    mirror = predictor(state, images[:, :, ::-1])["probs"][:, :, ::-1]
    np.testing.assert_allclose(np.asarray(flipped), (plain + mirror) / 2, atol=1e-6)
    probs = inference.ms_flip_probs(state, images, model=run.model, scales=(0.5, 1.0), flip=True)
    mirrored = inference.ms_flip_probs(state, images[:, :, ::-1], model=run.model,
                                     scales=(0.5, 1.0), flip=True)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mirrored)[:, :, ::-1], np.asarray(probs), atol=1e-5)
    assert not np.allclose(np.asarray(probs), np.asarray(flipped), atol=1e-4)


def test_eval_input_places_the_normalised_image_top_left_on_the_mean_pixel():
    from scaleattn.data import eval_input
    image = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)          # [1, 2, 3]
    out = eval_input.eval_image(image, (2, 3), mean=(10, 20, 30), std=(2, 4, 5))
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0, 0, 0])
    np.testing.assert_allclose(out[0, 1], [15, 7.5, 6])               # (40-10)/2, ...
    assert not out[1].any() and not out[:, 2].any()                   # padding = 0
    label = eval_input.eval_label(np.array([[1, 2]], np.uint8), (2, 3), ignore_label=254)
    np.testing.assert_array_equal(label, [[1, 2, 254], [254, 254, 254]])
    assert eval_input.padded_size(500, 375, 513) == (513, 513)
    assert eval_input.padded_size(530, 20, 513) == (536, 513)
