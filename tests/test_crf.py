"""The dense CRF: against an exact O(N^2) numpy CRF on tiny images, against pydensecrf2
(Krähenbühl's C++ code, when installed), its lattice geometry, padding, bad input; and
its wiring into eval (single scale and ms+flip), predict, crf_search and run.json."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from scaleattn import checkpoint, crf, crf_search, experiment, predict, records, report
from scaleattn import config as config_lib

DEEPLAB = crf.CRFParams.from_config(config_lib.base_config().crf)


# ------------------------------------------------------------ the exact reference ---


def exact_dense_crf(log_probs, image, valid, params: crf.CRFParams) -> np.ndarray:
    """Mean field with exact Gaussian kernels, every pair of pixels (float64).

    ``log_probs [H, W, C]``, ``image [H, W, 3]`` (0..255), ``valid [H, W]`` ->
    ``[H, W, C]``; the model of `scaleattn.crf` written out from its definition:
    ``Q <- softmax(log P + sum_m w_m K~_m Q)`` over the valid pixels, ``K_m`` including
    ``i = j``, ``D_m = diag(K_m 1)`` and ``K~_m = D_m^-1 K_m`` ('row', the 2011
    densecrf's ``norm_[i] * K Q``) or ``D_m^-1/2 K_m D_m^-1/2`` ('symmetric').
    """
    h, w, c = log_probs.shape
    rows, cols = np.mgrid[:h, :w]
    position = np.stack([cols, rows], -1).reshape(-1, 2).astype(np.float64)
    colour = image.reshape(-1, 3).astype(np.float64)
    inside = valid.reshape(-1)

    def normalised_kernel(features):
        squared = ((features[:, None] - features[None]) ** 2).sum(-1)
        kernel = np.exp(-0.5 * squared) * inside[:, None] * inside[None]
        sums = kernel.sum(1) + 1e-300
        if params.normalization == "row":
            return np.where(inside, 1.0 / sums, 0.0)[:, None] * kernel
        scale = np.where(inside, 1.0 / np.sqrt(sums), 0.0)
        return scale[:, None] * kernel * scale[None]

    appearance = normalised_kernel(np.concatenate(
        [position / params.bilateral_xy_std, colour / params.bilateral_rgb_std], 1))
    smoothness = normalised_kernel(position / params.gaussian_xy_std)
    unary = log_probs.reshape(-1, c).astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    q = start = softmax(unary)
    for _ in range(params.iterations):
        q = softmax(unary + params.bilateral_weight * appearance @ q
                    + params.gaussian_weight * smoothness @ q)
    return np.where(inside[:, None], q, start).reshape(h, w, c)


def scene(rng, height, width, classes, *, colour_noise=8.0, score_noise=1.0):
    """A tiny labelled picture: discs of random colours on a background, and noisy scores.

    Returns ``(rgb float32 [H, W, 3] with integer values, truth [H, W],
    log_probs float32 [H, W, C])``.
    """
    truth = np.zeros((height, width), np.int64)
    rows, cols = np.mgrid[:height, :width]
    for label in range(1, classes):
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2, 5)
        truth[(rows - cy) ** 2 + (cols - cx) ** 2 < radius ** 2] = label
    colours = rng.integers(0, 256, (classes, 3))
    image = np.clip(colours[truth] + rng.normal(0, colour_noise, (height, width, 3)), 0, 255)
    logits = rng.normal(0, score_noise, (height, width, classes)) + 1.5 * np.eye(classes)[truth]
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)))
    return image.round().astype(np.float32), truth, log_probs


def run_crf(log_probs, image, valid, params, **kwargs) -> np.ndarray:
    """`crf.dense_crf` on one image (adds and removes the batch axis)."""
    return np.asarray(crf.dense_crf(log_probs[None], image[None], valid[None], params,
                                    **kwargs))[0]


# ------------------------------------------------------------ against the reference ---


# Ten iterations and theta_gamma = 3 everywhere: one compilation per image size and
# normalisation.
NARROW = crf.CRFParams(10, 5.0, 3.0, 10.0, 3.0, 3.0)       # position matters at 12 px


@pytest.mark.parametrize("normalization", ["row", "symmetric"])
@pytest.mark.parametrize("params", [
    DEEPLAB,                                               # the defaults (LargeFOV)
    NARROW,
    crf.CRFParams(10, 4.0, 6.0, 20.0, 1.5, 3.0),
], ids=["deeplab_largefov", "narrow", "wide"])
def test_matches_the_exact_dense_crf_on_tiny_images(params, normalization):
    """Marginals within 0.01 on average (0.1 at the 98th percentile) and 99% of the labels
    of the exact CRF: the lattice approximates the appearance kernel."""
    params = dataclasses.replace(params, normalization=normalization)
    rng = np.random.default_rng(0)
    same, differences, changed = [], [], []
    for _ in range(6):
        image, _, log_probs = scene(rng, 12, 12, 3)
        valid = np.ones((12, 12), bool)
        marginals = run_crf(log_probs, image, valid, params)
        reference = exact_dense_crf(log_probs, image, valid, params)
        np.testing.assert_allclose(marginals.sum(-1), 1.0, atol=1e-5)
        same.append(marginals.argmax(-1) == reference.argmax(-1))
        differences.append(np.abs(marginals - reference))
        changed.append(reference.argmax(-1) != log_probs.argmax(-1))
    assert np.mean(changed) > 0.05            # the CRF does change labels here ...
    assert np.mean(same) >= 0.99              # ... and the lattice CRF changes the same ones
    assert np.mean(differences) < 0.01
    assert np.quantile(differences, 0.98) < 0.1


def test_normalisations_are_the_2011_and_2013_messages():
    """One iteration, smoothness kernel only (computed exactly on the grid), on a 5x4
    image: the marginals equal numpy's softmax(log P + w D^-1 K Q) ('row') and
    softmax(log P + w D^-1/2 K D^-1/2 Q) ('symmetric') to float32 precision, and the two
    differ (corner and edge pixels have smaller kernel sums)."""
    rng = np.random.default_rng(8)
    log_probs = np.asarray(jax.nn.log_softmax(rng.normal(0, 1, (5, 4, 3)).astype(np.float32)))
    image = rng.integers(0, 256, (5, 4, 3)).astype(np.float32)
    rows, cols = np.mgrid[:5, :4]
    position = np.stack([cols, rows], -1).reshape(-1, 2).astype(np.float64)
    kernel = np.exp(-0.5 * ((position[:, None] - position[None]) ** 2).sum(-1) / 1.5 ** 2)
    sums = kernel.sum(1)
    p = np.exp(log_probs.reshape(-1, 3).astype(np.float64))
    got = {}
    for normalization, message in [("row", (kernel / sums[:, None]) @ p),
                                   ("symmetric", (kernel / np.sqrt(sums[:, None] * sums[None]))
                                    @ p)]:
        params = crf.CRFParams(1, 0.0, 10.0, 10.0, 3.0, 1.5, normalization)
        z = log_probs.reshape(-1, 3) + 3.0 * message
        want = np.exp(z - z.max(1, keepdims=True))
        want /= want.sum(1, keepdims=True)
        got[normalization] = run_crf(log_probs, image, np.ones((5, 4), bool), params)
        np.testing.assert_allclose(got[normalization].reshape(-1, 3), want, atol=2e-6)
    assert np.abs(got["row"] - got["symmetric"]).max() > 1e-3


def test_unknown_normalization_is_a_config_error():
    config = config_lib.base_config()
    config.crf.normalization = "mean"
    with pytest.raises(config_lib.ConfigError, match=r"config\.crf\.normalization='mean'"):
        config_lib.validate(config)


@pytest.mark.parametrize("normalization", ["row", "symmetric"])
def test_padding_gives_the_crf_of_the_cropped_image(normalization):
    rng = np.random.default_rng(1)
    image, _, log_probs = scene(rng, 12, 12, 3)
    params = dataclasses.replace(NARROW, normalization=normalization)
    cropped = run_crf(log_probs, image, np.ones((12, 12), bool), params)
    padded_scores = np.zeros((16, 16, 3), np.float32)
    padded_scores[:12, :12] = log_probs
    padded_scores[12:, :, 0] = 5.0                           # anything: must not leak in
    padded_image = np.full((16, 16, 3), 255.0, np.float32)
    padded_image[:12, :12] = image
    valid = np.zeros((16, 16), bool)
    valid[:12, :12] = True
    padded = run_crf(padded_scores, padded_image, valid, params)
    np.testing.assert_allclose(padded[:12, :12], cropped, atol=1e-5)
    np.testing.assert_allclose(padded[12:], jax.nn.softmax(padded_scores[12:]), atol=1e-6)
    np.testing.assert_allclose(padded[:12, 12:], jax.nn.softmax(padded_scores[:12, 12:]),
                               atol=1e-6)


def test_fitted_lattice_gives_the_same_marginals():
    rng = np.random.default_rng(2)
    image, _, log_probs = scene(rng, 12, 12, 3)
    valid = np.ones((1, 12, 12), bool)
    count = int(crf.count_vertices(image[None], valid, DEEPLAB)[0])
    assert 12 * 12 < count < 12 * 12 * 6                     # shared vertices are counted once
    assert crf.fitted_capacity([count]) == 1024
    assert crf.fitted_capacity([3000, 1025]) == 4096
    full = crf.dense_crf(log_probs[None], image[None], valid, DEEPLAB)
    fitted = crf.dense_crf_fitted(log_probs[None], image[None], valid, DEEPLAB)
    np.testing.assert_allclose(np.asarray(fitted), np.asarray(full), atol=1e-6)
    # Several appearance weights on one lattice: each as if run alone.
    both = crf.dense_crf_weights(log_probs[None], image[None], valid, DEEPLAB, (4.0, 0.0),
                                 capacity=1024)
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(full), atol=1e-6)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(crf.dense_crf(
        log_probs[None], image[None], valid, dataclasses.replace(DEEPLAB, bilateral_weight=0.0),
        capacity=1024)), atol=1e-6)


def test_the_crf_follows_colour_edges():
    """Two colour halves, scores that are right on average but noisy: the appearance
    kernel pulls each half to one label (Potts smoothing along colour regions)."""
    rng = np.random.default_rng(3)
    image = np.zeros((12, 12, 3), np.float32)
    image[:, 6:] = 200.0
    truth = np.zeros((12, 12), np.int64)
    truth[:, 6:] = 1
    logits = 0.8 * np.eye(3)[truth] + rng.normal(0, 1.0, (12, 12, 3))
    logits[..., 2] -= 3.0                                    # a third class, never right
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)))
    assert (log_probs.argmax(-1) == truth).mean() < 0.8
    params = crf.CRFParams(10, 10.0, 50.0, 20.0, 0.0, 3.0)
    assert (run_crf(log_probs, image, np.ones((12, 12), bool), params).argmax(-1)
            == truth).all()


# ------------------------------------------------------------ the lattice ---


def test_simplex_vertices_enclose_each_point():
    """Every point is the barycentric combination of its simplex's vertices, whose
    coordinates are those of the permutohedral lattice: integers summing to 0, each
    vertex of 'remainder' r congruent to r modulo d + 1."""
    features = np.random.default_rng(4).normal(0, 3, (200, 5)).astype(np.float32)
    elevated = np.asarray(jax.jit(crf.elevate)(features))
    np.testing.assert_allclose(elevated.sum(1), 0.0, atol=1e-4)
    keys, weights = map(np.asarray, jax.jit(crf.enclosing_simplex)(elevated))
    vertices = np.concatenate([keys, -keys.sum(-1, keepdims=True)], -1)      # [N, 6, 6]
    assert (weights >= -1e-6).all()
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.einsum("nr,nrk->nk", weights, vertices), elevated,
                               atol=1e-3)
    for remainder in range(6):
        assert (np.mod(vertices[:, remainder], 6) == remainder).all()
    # Neighbouring vertices of a simplex differ by one lattice step.
    steps = np.abs(np.diff(vertices, axis=1))
    assert set(np.unique(steps)) <= {0, 1, 5}


def test_find_rows_is_a_lookup_in_the_sorted_table():
    rng = np.random.default_rng(5)
    rows = np.unique(rng.integers(-3, 3, (60, 3)), axis=0).astype(np.int32)   # sorted
    queries = rng.integers(-4, 4, (100, 3)).astype(np.int32)
    found = np.asarray(crf.find_rows(rows, queries))
    index = {tuple(r): i for i, r in enumerate(rows)}
    np.testing.assert_array_equal(found, [index.get(tuple(q), len(rows)) for q in queries])


def test_padded_image_mask_finds_the_image_in_an_eval_batch():
    image = np.zeros((2, 8, 8, 3), np.float32)
    label = np.full((2, 8, 8), 255, np.int32)
    image[0, :5, :7] = 0.3                                   # a 5 x 7 image, top left ...
    label[0, :5, :7] = 1
    label[0, 4, :] = 255                                     # ... whose last row is ignored
    image[0, 4, 2] = 0.0                                     # ... and one pixel is the mean
    got = np.asarray(crf.padded_image_mask(image, label, 255))
    want = np.zeros((2, 8, 8), bool)
    want[0, :5, :7] = True                                   # example 1 is filler: nothing
    np.testing.assert_array_equal(got, want)


def test_rgb_of_a_normalised_image():
    rgb = np.array([[0.0, 127.0, 255.0]], np.float32)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    normalised = (rgb - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(np.asarray(crf.image_rgb(normalised, mean, std)), rgb,
                               atol=1e-4)


# ------------------------------------------------------------ bad input ---


def test_scores_of_another_size_than_the_image_are_an_error():
    scores = np.zeros((1, 12, 12, 3), np.float32)
    with pytest.raises(ValueError, match=r"scores \(1, 12, 12, 3\).*image \(1, 12, 13, 3\)"):
        crf.dense_crf(scores, np.zeros((1, 12, 13, 3)), np.ones((1, 12, 12), bool), DEEPLAB)
    with pytest.raises(ValueError, match="upsample the scores"):
        crf.dense_crf_fitted(scores, np.zeros((1, 12, 12, 3)), np.ones((1, 6, 6), bool),
                             DEEPLAB)


@pytest.mark.parametrize("key,value", [
    ("bilateral_xy_std", 0.0), ("bilateral_rgb_std", -5.0), ("gaussian_xy_std", 0.0),
    ("iterations", 0), ("bilateral_weight", -1.0), ("search_images", 0),
    ("search_bilateral_xy_stds", (50.0, 0.0)), ("search_bilateral_weights", ()),
])
def test_bad_crf_values_name_the_key(key, value):
    config = config_lib.base_config()
    config.crf[key] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.crf\.{key}=.*must be"):
        config_lib.validate(config)


# ------------------------------------------------------------ against pydensecrf2 ---


def pydensecrf_marginals(log_probs, image, params):
    """pydensecrf2's marginals with ``params.normalization``: the 2013 code's
    NORMALIZE_SYMMETRIC, or NORMALIZE_AFTER (``norm * K(Q)``, norm = 1 / K1: the 2011
    code's row normalisation)."""
    densecrf = pytest.importorskip("pydensecrf.densecrf")
    normalization = {"row": densecrf.NORMALIZE_AFTER,
                     "symmetric": densecrf.NORMALIZE_SYMMETRIC}[params.normalization]
    h, w, c = log_probs.shape
    model = densecrf.DenseCRF2D(w, h, c)
    model.setUnaryEnergy(np.ascontiguousarray(-log_probs.reshape(-1, c).T))
    model.addPairwiseGaussian(sxy=params.gaussian_xy_std, compat=params.gaussian_weight,
                              normalization=normalization)
    model.addPairwiseBilateral(sxy=params.bilateral_xy_std, srgb=params.bilateral_rgb_std,
                               rgbim=np.ascontiguousarray(image.astype(np.uint8)),
                               compat=params.bilateral_weight, normalization=normalization)
    return np.asarray(model.inference(params.iterations)).T.reshape(h, w, c)


@pytest.mark.parametrize("normalization", ["row", "symmetric"])
@pytest.mark.parametrize("params", [DEEPLAB, crf.CRFParams(10, 5.0, 8.0, 10.0, 3.0, 3.0)],
                         ids=["deeplab_largefov", "narrow"])
def test_matches_pydensecrf(params, normalization):
    """Same model, same lattice for the appearance kernel (pydensecrf also puts the
    smoothness kernel on a lattice, where we filter exactly), in both normalisations."""
    params = dataclasses.replace(params, normalization=normalization)
    rng = np.random.default_rng(6)
    image, _, log_probs = scene(rng, 32, 32, 4, colour_noise=6.0)
    reference = pydensecrf_marginals(log_probs, image, params)
    marginals = run_crf(log_probs, image, np.ones((32, 32), bool), params)
    assert np.mean(reference.argmax(-1) != log_probs.argmax(-1)) > 0.05
    assert np.mean(marginals.argmax(-1) == reference.argmax(-1)) >= 0.99
    assert np.mean(np.abs(marginals - reference)) < 0.02


# ------------------------------------------------------------ wiring (tiny demo run) ---


@pytest.fixture(scope="module")
def tiny_run(tiny_demo_config, tmp_path_factory):
    """A workdir holding the step-0 checkpoint of a tiny demo attention model, and
    its config (4 val images of 128 x 128, one eval batch)."""
    config = tiny_demo_config(images=(8, 4), crop=48, fc_width=32, batch=4, steps=1,
                              log_every=1, checkpoint_every=1)
    config.crf.iterations = 3  # the wiring, not the CRF, is tested here
    experiment.prepare_data(config.data)
    run = experiment.setup_run(config)
    rng = jax.random.PRNGKey(config.seed)
    workdir = str(tmp_path_factory.mktemp("run"))
    manager = checkpoint.make_manager(workdir, 1, training=True)
    checkpoint.save(manager, 0, experiment.initial_state(run, rng), rng, config)
    manager.wait_until_finished()
    return config, workdir


def with_values(config, **values):
    """A copy of ``config`` with ``section__key=value`` changes."""
    config = config.copy_and_resolve_references()
    for name, value in values.items():
        section, key = name.split("__")
        config[section][key] = value
    return config


def folder_state(path) -> dict:
    """``{relative path: (size, mtime)}`` of every file under ``path``."""
    return {os.path.relpath(os.path.join(root, name), path):
            (os.path.getsize(os.path.join(root, name)),
             os.path.getmtime(os.path.join(root, name)))
            for root, _, names in os.walk(path) for name in names}


def test_eval_scores_with_and_without_the_crf_in_one_pass(tiny_run):
    """``--mode=eval`` with the CRF, single scale (in the eval step, a lattice for any
    image, from logits) and ms+flip at one scale without flip (from averaged
    probabilities, a fitted lattice): the same inference, so the same labels with and
    without the CRF."""
    config, workdir = tiny_run
    config = with_values(config, eval__crf=True, predict__ms_eval_at_end=True,
                         predict__ms_scales=(1.0,), predict__flip=False)
    scores = experiment.evaluate_checkpoint(config, workdir)
    ms_flip = scores["ms_flip"]
    assert set(scores["no_crf"]) == set(ms_flip["no_crf"]) == {"miou", "pixel_accuracy",
                                                               "per_class_iou"}
    # One path takes the argmax of logits, the other of probabilities (and the CRF runs
    # in another float order), so on this untrained model's near-tied scores a few
    # pixels can go either way (seen on scale_shapes 3.0.0: 5e-6 of mIoU without the
    # CRF); a wiring fault moves whole images.
    assert ms_flip["no_crf"]["miou"] == pytest.approx(scores["no_crf"]["miou"], abs=1e-4)
    assert ms_flip["miou"] == pytest.approx(scores["miou"], abs=1e-4)
    np.testing.assert_allclose(ms_flip["per_class_iou"], scores["per_class_iou"], atol=1e-3)


def test_predict_writes_the_crf_mask_beside_the_plain_one(tiny_run, tmp_path):
    config, workdir = tiny_run
    rgb = np.random.default_rng(7).integers(0, 255, (30, 37, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    written = predict.predict_files(with_values(config, eval__crf=True), workdir,
                                    [str(tmp_path / "a.png")], str(tmp_path / "out"))
    assert str(tmp_path / "out" / "a_mask_crf.png") in written
    with Image.open(tmp_path / "out" / "a_mask_crf.png") as crf_mask:
        assert crf_mask.mode == "P" and crf_mask.size == (37, 30)
        assert np.array(crf_mask).max() < config.model.num_classes


@pytest.mark.parametrize("normalization", ["row", "symmetric"])
def test_crf_search_scores_the_grid_and_writes_only_its_output(tiny_run, tmp_path,
                                                               normalization):
    config, workdir = tiny_run
    config = with_values(config, crf__search_images=4, crf__gaussian_weight=0.0,
                         crf__normalization=normalization,
                         crf__search_bilateral_weights=(0.0, 6.0),
                         crf__search_bilateral_xy_stds=(20.0,),
                         crf__search_bilateral_rgb_stds=(5.0, 15.0))  # + the config's own
    before = folder_state(workdir)
    output = tmp_path / "search.json"
    record = crf_search.search(config, workdir, str(output))
    assert folder_state(workdir) == before
    assert json.loads(output.read_text()) == json.loads(json.dumps(record))
    assert record["images"] == 4 and record["checkpoint_step"] == 0
    settings = [(r["bilateral_weight"], r["bilateral_xy_std"], r["bilateral_rgb_std"])
                for r in record["results"]]
    assert settings == [(0.0, 20.0, 5.0), (6.0, 20.0, 5.0), (0.0, 20.0, 15.0),
                        (6.0, 20.0, 15.0)]
    for result in record["results"]:
        if result["bilateral_weight"] == 0.0:   # no pairwise term: the network's labels
            assert result["miou"] == record["miou_no_crf"]
    assert record["best"] == max(record["results"], key=lambda r: r["miou"])
    assert {r["normalization"] for r in record["results"]} == {normalization}
    assert record["config_setting"]["bilateral_xy_std"] == DEEPLAB.bilateral_xy_std
    best = record["best"]
    assert record["flags"] == (f"--config.crf.bilateral_weight={best['bilateral_weight']:g} "
                               f"--config.crf.bilateral_xy_std={best['bilateral_xy_std']:g} "
                               f"--config.crf.bilateral_rgb_std={best['bilateral_rgb_std']:g}")


def test_run_record_says_whether_and_how_and_report_matches_crf_rows():
    config = config_lib.recipe("voc:baseline")
    scores = {"miou": 0.70, "pixel_accuracy": 0.9, "no_crf": {"miou": 0.65}}
    kwargs = dict(steps=1, ms_flip_scores=None, wall_time_s=1.0,
                  params={"w": np.zeros(2, np.float32)})
    plain = records.run_record(config, scores={"miou": 0.65, "pixel_accuracy": 0.9}, **kwargs)
    assert plain["crf"] == {"applied": False} and plain["miou_no_crf"] is None
    assert report.paper_reference(plain)["crf"] is False
    config.eval.crf = True
    record = records.run_record(config, scores=scores, **kwargs)
    assert record["crf"] == {"applied": True, **DEEPLAB.as_dict()}   # the config's values
    assert record["miou"] == 0.70 and record["miou_no_crf"] == 0.65
    row = report.paper_reference(json.loads(json.dumps(record)))
    assert row["crf"] is True and "CRF" in row["what"]
