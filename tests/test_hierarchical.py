"""Hierarchical multi-scale attention: the inference chain against numpy, the model on
any scale list without retraining, its loss terms and its configs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn import losses
from scaleattn.models import build_model, scale_attention


def numpy_bilinear(x, size):
    """Align-corners bilinear resize ``[B, h, w, C] -> [B, H, W, C]``, by separable
    interpolation written out per output coordinate."""
    def axis_weights(n_in, n_out):
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            pos = 0.0 if n_out == 1 else o * (n_in - 1) / (n_out - 1)
            lo = min(int(np.floor(pos)), max(n_in - 2, 0))
            frac = pos - lo
            w[o, lo] += 1 - frac
            if n_in > 1:
                w[o, lo + 1] += frac
        return w
    wh, ww = axis_weights(x.shape[1], size[0]), axis_weights(x.shape[2], size[1])
    return np.einsum("oh,pw,bhwc->bopc", wh, ww, x.astype(np.float64))


def numpy_chain(maps, alphas, scales):
    """The reference implementations' inference: largest scale first, then each smaller
    one merged in with its alpha (written independently of the module)."""
    by_scale = sorted(zip(scales, maps, alphas), key=lambda t: t[0], reverse=True)
    pred = by_scale[0][1].astype(np.float64)
    for scale, f, a in by_scale[1:]:
        if scale >= 1:
            pred = a * f + (1 - a) * numpy_bilinear(pred, f.shape[1:3])
        else:
            pred = (numpy_bilinear(a * f, pred.shape[1:3])
                    + (1 - numpy_bilinear(a, pred.shape[1:3])) * pred)
    return pred


@pytest.mark.parametrize("scales", [(1.0, 0.5), (0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 1.5, 2.0)])
def test_chain_matches_numpy(scales):
    rng = np.random.RandomState(len(scales))
    maps = [rng.randn(2, int(np.ceil(12 * s)), int(np.ceil(9 * s)), 3).astype(np.float32)
            for s in scales]
    alphas = [rng.rand(*m.shape[:3], 1).astype(np.float32) for m in maps]
    got = scale_attention.hierarchical_merge([jnp.asarray(m) for m in maps],
                                             [jnp.asarray(a) for a in alphas], scales)
    assert got.shape == maps[scales.index(1.0)].shape  # ends at the scale-1 size
    np.testing.assert_allclose(got, numpy_chain(maps, alphas, scales), rtol=1e-5, atol=1e-5)


def test_two_scale_training_merge_is_the_papers_formula():
    """Training on {0.5, 1}: merged = up(a_0.5 f_0.5) + (1 - up(a_0.5)) f_1."""
    rng = np.random.RandomState(0)
    f1, f05 = rng.randn(1, 8, 8, 2), rng.randn(1, 4, 4, 2)
    a05 = rng.rand(1, 4, 4, 1)
    expected = numpy_bilinear(a05 * f05, (8, 8)) + (1 - numpy_bilinear(a05, (8, 8))) * f1
    got = scale_attention.hierarchical_merge(
        [jnp.asarray(f05, jnp.float32), jnp.asarray(f1, jnp.float32)],
        [jnp.asarray(a05, jnp.float32), jnp.ones((1, 8, 8, 1))], (0.5, 1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def tiny_config(backbone="vgg16", head=None, **model):
    c = config_lib.recipe("demo:hier")
    m = c.model
    m.backbone, m.num_classes, m.width, m.fc_width, m.alpha_width = backbone, 3, 1 / 16, 32, 64
    m.depth = (1, 1, 1, 1, 1) if backbone == "vgg16" else (1, 1, 1, 1)
    m.head = head or ("largefov" if backbone == "vgg16" else "aspp_v2")
    m.gsag_window, m.bn_mode = 3, ("train" if head == "gsag" else "frozen")
    for key, value in model.items():
        m[key] = value
    config_lib.validate(c)
    return c


@pytest.mark.parametrize("backbone,head", [("vgg16", None), ("resnet50", "aspp_v2"),
                                           ("resnet50", "gsag")])
def test_model_runs_on_any_inference_scales_with_the_same_parameters(backbone, head):
    config = tiny_config(backbone, head)
    model = build_model(config.model)
    images = jnp.asarray(np.random.RandomState(1).randn(1, 40, 40, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0),
                                                                     images)
    assert "alpha" in variables["params"]
    out = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                           rngs={"dropout": jax.random.PRNGKey(1)},
                                           mutable=["batch_stats"])[0])(variables, images)
    assert out["attention"].shape == (1, 5, 5, 2) and len(out["branch_logits"]) == 2
    assert bool(jnp.all((out["attention"] > 0) & (out["attention"] < 1)))
    config.model.inference_scales = (0.25, 0.5, 1.0, 2.0)
    wider = build_model(config.model)
    out = jax.jit(functools.partial(wider.apply, train=False))(variables, images)
    assert out["logits"].shape == (1, 5, 5, 3) and out["attention"].shape == (1, 5, 5, 4)
    maps = [np.asarray(m) for m in out["branch_logits"]]
    assert [m.shape[1] for m in maps] == [2, 3, 5, 10]
    # the model's merged output is the chain of its own branch maps and alphas
    alphas = [np.asarray(a) for a in _alphas(wider, variables, images)]
    np.testing.assert_allclose(out["logits"], numpy_chain(maps, alphas, (0.25, 0.5, 1.0, 2.0)),
                               rtol=1e-4, atol=1e-4)


def _alphas(model, variables, images):
    """Each branch's alpha, read back through the module's intermediates."""
    def capture(variables, images):
        return model.apply(variables, images, train=False,
                           capture_intermediates=lambda mdl, _: isinstance(
                               mdl, scale_attention.ScaleAlphaHead), mutable=["intermediates"])
    _, state = jax.jit(capture)(variables, images)
    return state["intermediates"]["alpha"]["__call__"]


def test_loss_has_a_merged_term_and_one_per_branch():
    config = tiny_config()
    model = build_model(config.model)
    images = jnp.zeros((1, 40, 40, 3))
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    out = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                      mutable=["batch_stats"])[0]
    _, terms = losses.segmentation_loss(out, jnp.zeros((1, 40, 40), jnp.int32), config.loss)
    assert sorted(terms) == ["loss_merged", "loss_scale_0", "loss_scale_1"]


def test_only_hierarchical_runs_on_untrained_scales():
    config = config_lib.recipe("demo")
    config.model.inference_scales = (0.5, 1.0, 2.0)
    with pytest.raises(config_lib.ConfigError, match="model.inference_scales"):
        config_lib.validate(config)
    config = config_lib.recipe("voc_r101:hier")
    config_lib.validate(config)
    assert config.model.scales == (0.5, 1.0) and config_lib.inference_scales(
        config.model) == (0.5, 1.0, 2.0)
    config.model.inference_scales = (0.5, 2.0)
    with pytest.raises(config_lib.ConfigError, match="contain 1.0"):
        config_lib.validate(config)


def test_predict_and_analyze_a_hierarchical_run_on_a_wider_scale_list(tmp_path):
    """A trained hierarchical checkpoint, read with another inference scale list: predict
    writes one alpha map per inference scale and analyze relates them to object size."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from scaleattn import analysis, checkpoint, experiment, predict# pylint: disable=import-outside-toplevel
    config = tiny_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.demo_train_size, config.data.demo_val_size = 4, 4
    config.data.crop_size, config.data.eval_size = 32, 128
    config.eval.batch_size, config.parallel.mode = 4, "jit"
    workdir = str(tmp_path / "run")
    run = experiment.setup_run(config)
    state = experiment.initial_state(run, jax.random.PRNGKey(0))
    manager = checkpoint.make_manager(workdir, 1, training=True)
    checkpoint.save(manager, 0, state, jax.random.PRNGKey(0), config)
    manager.wait_until_finished()

    config.model.inference_scales = (0.5, 1.0, 2.0)
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 37, 3), np.uint8)).save(image)
    written = predict.predict_files(config, workdir, [str(image)], str(tmp_path / "out"))
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert {"a_attention_0_x0.5.png", "a_attention_1_x1.png", "a_attention_2_x2.png"} <= names
    summary = analysis.analyze(config, workdir, str(tmp_path / "analysis"))
    assert summary["scales"] == [0.5, 1.0, 2.0] and summary["objects"] > 0
    assert len(summary["spearman_weight_vs_area"]) == 3


def test_pmap_and_sharded_training_equal_jit_and_bf16_runs():
    """The same two steps of a hierarchical model (trained, synchronised batch norm in the
    alpha head) on one device, pmap over 8 and a 4x2 FSDP mesh; bf16 keeps close."""
    from scaleattn import experiment# pylint: disable=import-outside-toplevel
    from scaleout_common import fixed_batch, run_steps  # pylint: disable=import-outside-toplevel
    from scaleout_common import tiny_config as scaleout_config  # pylint: disable=import-outside-toplevel

    def config(mode, **kwargs):
        c = scaleout_config(mode, **kwargs)
        c.model.scales, c.model.merge, c.model.alpha_width = (1.0, 0.5), "hierarchical", 64
        c.model.head, c.model.fc_width = "largefov", 32
        c.loss.extra_supervision = True
        return c

    batches = [fixed_batch()] * 2
    reference_run = experiment.setup_run(config("jit"))
    init_rng, rng = jax.random.split(jax.random.PRNGKey(0))
    state = jax.device_get(experiment.initial_state(reference_run, init_rng))
    assert "bn1" in state.params["alpha"] and "alpha" in state.batch_stats
    ref_state, ref_losses = run_steps(reference_run, state, batches, np.asarray(rng))
    for mode, mesh, sharding in [("pmap", (-1, 1), "replicated"), ("sharded", (4, 2), "fsdp")]:
        other = experiment.setup_run(config(mode, mesh=mesh, param_sharding=sharding))
        other_state, losses = run_steps(other, state, batches, np.asarray(rng))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for tree in ("params", "batch_stats"):
            for x, y in zip(jax.tree_util.tree_leaves(getattr(ref_state, tree)),
                            jax.tree_util.tree_leaves(getattr(other_state, tree))):
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=f"{mode} {tree}")
    bf16 = experiment.setup_run(config("jit", dtype="bfloat16"))
    outputs = bf16.model.apply({"params": ref_state.params, "batch_stats": ref_state.batch_stats},
                               batches[0]["image"], train=False)
    reference = reference_run.model.apply({"params": ref_state.params,
                                           "batch_stats": ref_state.batch_stats},
                                          batches[0]["image"], train=False)
    assert outputs["logits"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(outputs["logits"], np.float32), reference["logits"],
                               rtol=5e-2, atol=5e-2)
