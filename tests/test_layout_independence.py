"""Every shipped config trains the same on any device layout.

For each file of configs/ (its real model, head, merge, loss, extra supervision and
batch-norm mode; tiny widths, one block per stage, 25 px crops, trained from scratch),
one train step on the same global batch of 8 gives the same loss, loss terms and
parameter update (hence gradient) under `jit` on one device, `pmap` over the 8 fake
CPU devices of conftest (one image each) and 'sharded' `jit` on a 4x2 mesh (two images
per data shard). A loss that depends on how the batch is split (OHEM's ``min_kept``
counted per device, a per-device pixel normalisation, unsynchronised batch-norm
statistics) fails it.

Shrinking keeps what could depend on the layout: OHEM's ``min_kept`` keeps its share of
a crop, and its threshold is 0, so that ``min_kept`` alone decides (at initialisation
every true-class probability is about 1 / classes, below the recipes' 0.7, and OHEM
would keep every pixel whatever the rule). Dropout is off: its masks are drawn per
replica, random by design. Configs that are the same computation once shrunk (ResNet-50
and -101 at one block per stage) are run once. The ResNeXt configs on the 4x2 mesh are
skipped: XLA gets their grouped convolutions' kernel gradients wrong there (they fail
with the grad norm off by 1-9 %), which the strict expected failure
`test_grouped_convolution_gradient_on_a_two_dimensional_mesh` shows in four lines; when
XLA is fixed that test fails, and the skips go with its mark.
"""
import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from scaleattn import config as config_lib
from scaleattn import experiment, loop, parallel
from scaleattn.models import resnet
from scaleout_common import fixed_batch

CROP = 25
WIDTH = 1 / 32
LAYOUTS = [("pmap", (-1, 1)), ("sharded", (4, 2))]
# Summation order differs between layouts (psum of per-device sums, sharded reductions):
# losses agree to RTOL; parameter updates to RTOL plus UPDATE_ATOL x the largest update
# of any parameter (behind trained batch norm, gradients are sums that nearly cancel and
# keep only float32 noise in their last bits; a layout-dependent loss moves the updates
# by a sizeable fraction of the largest).
RTOL, UPDATE_ATOL = 2e-5, 1e-4


def shrunk(name: str):
    """The shipped config ``name`` (`config.recipe`'s ``file[:variants]``) at test size,
    on the jit layout."""
    c = config_lib.recipe(name)
    real_crop = c.data.crop_size
    c.data.crop_size = CROP
    c.model.width = WIDTH
    c.model.depth = (1,) * (5 if c.model.backbone == "vgg16" else 4)
    c.model.init_from = "scratch"
    c.model.dropout = c.model.attention_dropout = c.model.gsag_dropout = 0.0
    if c.loss.type == "ohem":
        c.loss.ohem_threshold = 0.0
        c.loss.ohem_min_kept = max(1, round(c.loss.ohem_min_kept * CROP ** 2 / real_crop ** 2))
    c.batch_size = 8
    c.train.grad_accum_steps = 1
    c.optim.schedule, c.optim.weight_decay = "constant", 0.0  # the update is -lr x grad
    c.parallel.mode, c.parallel.mesh_shape = "jit", (-1, 1)
    c.parallel.param_sharding = "replicated"
    return c


def distinct_configs() -> dict:
    """``{names: name}``: the shipped configs (`config.shipped`), one per distinct shrunk
    computation."""
    groups = {}
    for spec in config_lib.shipped():
        name = spec.split("/", 1)[1].replace(".py", "")
        c = shrunk(name)
        parts = {k: c[k].to_dict() for k in ("model", "loss", "optim")}
        if c.model.backbone in resnet.ARCHITECTURES:  # the layers, whatever the name says
            architecture = dict(resnet.ARCHITECTURES[c.model.backbone], stage_sizes=None)
            parts["model"]["backbone"] = sorted(architecture.items())
        key = json.dumps(parts, sort_keys=True, default=str)
        groups.setdefault(key, []).append(name)
    return {"+".join(names): names[0] for names in groups.values()}


CONFIGS = distinct_configs()


def one_step(run, state, batch, rng):
    """``(loss and terms, parameter update)`` of one train step of ``run`` from host
    ``state`` on host ``batch``."""
    layout = run.layout
    new_state, step_metrics = run.train_step(layout.put_state(state), layout.put_batch(batch),
                                             layout.put_replicated(rng))
    new_params = jax.device_get(layout.host(new_state).params)
    update = jax.tree_util.tree_map(np.subtract, new_params, state.params)
    return loop.read_scalars(layout, step_metrics), flax.traverse_util.flatten_dict(update,
                                                                                    sep="/")


@functools.lru_cache(maxsize=None)
def reference(recipe: str):
    """``(config, host initial state, batch, rng, jit scalars, jit update)`` of ``recipe``."""
    config = shrunk(recipe)
    run = experiment.setup_run(config)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = jax.device_get(experiment.initial_state(run, init_rng))
    train_rng = np.asarray(train_rng)
    batch = fixed_batch(8, CROP)
    batch["label"] = np.where(batch["label"] == 255, config.loss.ignore_label,
                              np.minimum(batch["label"], config.model.num_classes - 1))
    return (config, state, batch, train_rng) + one_step(run, state, batch, train_rng)


def grouped_convolutions(recipe: str) -> bool:
    return resnet.ARCHITECTURES.get(shrunk(recipe).model.backbone, {}).get("groups", 1) > 1


def cases():
    """(recipe, layout) pairs; ResNeXt's grouped convolutions on a 2-D mesh, a known XLA
    failure, are skipped (module docstring)."""
    for name, recipe in CONFIGS.items():
        for mode, mesh in LAYOUTS:
            marks = []
            if mode == "sharded" and min(mesh) > 1 and grouped_convolutions(recipe):
                marks = [pytest.mark.skip(reason=(
                    "XLA on a (data, model) mesh with both > 1 computes wrong kernel "
                    "gradients of grouped convolutions: the strict xfail "
                    "test_grouped_convolution_gradient_on_a_two_dimensional_mesh"))]
            yield pytest.param(recipe, mode, mesh, marks=marks, id=f"{name}-{mode}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, mode, mesh", list(cases()))
def test_one_step_is_the_same_on_every_layout(recipe, mode, mesh):
    config, state, batch, train_rng, ref_scalars, ref_update = reference(recipe)
    assert np.isfinite(ref_scalars["loss"]) and ref_scalars["loss"] > 0
    assert any(np.any(u) for u in ref_update.values())
    scale = max(float(np.max(np.abs(u))) for u in ref_update.values())
    other = config.copy_and_resolve_references()
    other.parallel.mode, other.parallel.mesh_shape = mode, mesh
    scalars, update = one_step(experiment.setup_run(other), state, batch, train_rng)
    for name, value in ref_scalars.items():
        np.testing.assert_allclose(scalars[name], value, rtol=RTOL, err_msg=f"{mode} {name}")
    worst = 0.0
    for name, value in ref_update.items():
        np.testing.assert_allclose(update[name], value, rtol=RTOL,
                                   atol=UPDATE_ATOL * scale, err_msg=f"{mode} {name}")
        worst = max(worst, float(np.max(np.abs(update[name] - value))) / scale)
    print(f"{recipe} {mode}: largest update difference / largest update: {worst:.1e}")


@pytest.mark.xfail(strict=True, reason="XLA: grouped convolution kernel gradient with the "
                   "batch split over one axis of a 2-D mesh")
def test_grouped_convolution_gradient_on_a_two_dimensional_mesh():
    """The kernel gradient of a grouped convolution (ResNeXt's 3x3) with the batch split
    over 'data' of a 4x2 mesh equals the one-device gradient. It does on 8x1 and 1x8
    meshes; on 4x2 and 2x4 (jax / jaxlib 0.10.2, CPU) it is off by the gradient's own size,
    which is why the ResNeXt configs fail the sharded 4x2 case above."""
    def loss(kernel, x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=8)
        return jnp.sum(jnp.sin(y))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, 5, 8)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 1, 8)).astype(np.float32)
    expected = jax.jit(jax.grad(loss))(kernel, x)
    mesh = parallel.make_mesh((4, 2))
    got = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, PartitionSpec()))(
        jax.device_put(kernel, NamedSharding(mesh, PartitionSpec())),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mesh, refused", [((4, 2), True), ((2, 4), True), ((8, 1), False),
                                           ((1, 8), False)])
def test_resnext_is_refused_on_a_two_dimensional_mesh(mesh, refused):
    """Until XLA computes those gradients right, a ResNeXt run on a mesh with both axes
    larger than 1 stops before anything is built, naming the mesh and the fix; the meshes
    on which the gradient is exact pass the check."""
    config = config_lib.load("configs/gsag.py:hybrid,x101")
    config.parallel.mode, config.parallel.mesh_shape = "sharded", mesh
    layout = parallel.make_layout(config.parallel)
    if refused:
        with pytest.raises(config_lib.ConfigError, match=r"mesh_shape=.*(-1, 1)"):
            experiment.check_grouped_convolutions(config, layout)
    else:
        experiment.check_grouped_convolutions(config, layout)
    config.model.backbone = "resnet101"       # no grouped convolutions: any mesh
    experiment.check_grouped_convolutions(config, layout)
