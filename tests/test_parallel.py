"""One pure train step, three ways to run it: jit (one device), pmap and mesh-sharded jit.

On the 8 fake CPU devices of conftest: the same losses, parameters, batch-norm statistics
(trained, synchronised) and optimiser state after a few steps, for meshes 8x1, 4x2 and
2x4 with replicated, FSDP and model-sharded parameters; gradient accumulation equals one
big batch; bfloat16 compute keeps float32 state.
"""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from scaleattn import config as config_lib
from scaleattn import experiment, parallel
from scaleout_common import compiled_run, fixed_batch, max_differences, run_steps, tiny_config

STEPS = 3
# Tolerance of every comparison with the single-device run: summation order differs
# (per-device partial sums, psum, sharded reductions); measured max |diff| ~2e-7.
RTOL, ATOL = 1e-5, 1e-6


def assert_same_training(reference, other, name):
    (ref_state, ref_losses), (state, losses) = reference, other
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg=name)
    for tree in ("params", "batch_stats", "opt_state"):
        a = jax.tree_util.tree_leaves(getattr(ref_state, tree))
        b = jax.tree_util.tree_leaves(getattr(state, tree))
        assert len(a) == len(b) > 0, (name, tree)
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL, err_msg=f"{name} {tree}")
    assert int(state.step) == STEPS
    print(f"{name}: max |diff| {max_differences(ref_state, state)[0]:.2e}, "
          f"max rel {max_differences(ref_state, state)[1]:.2e}")


def test_mesh_shape_and_parameter_placement_rules():
    assert parallel.resolve_mesh_shape((-1, 1), 8) == (8, 1)
    assert parallel.resolve_mesh_shape((2, -1), 8) == (2, 4)
    for bad in ((3, -1), (-1, -1), (4, 4), (8,)):
        with pytest.raises(ValueError, match="mesh_shape"):
            parallel.resolve_mesh_shape(bad, 8)
    mesh = parallel.make_mesh((4, 2))
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (4, 2)
    sizes = {"data": 4, "model": 2}
    assert parallel.param_spec((3, 3, 16, 64), "fsdp", sizes) == P(None, None, None, "data")
    assert parallel.param_spec((3, 3, 64, 6), "fsdp", sizes) == P(None, None, "data", None)
    assert parallel.param_spec((5,), "fsdp", sizes) == P()  # nothing divides: replicated
    assert parallel.param_spec((3, 3, 16, 64), "fsdp", sizes, min_size=10**6) == P()
    assert parallel.param_spec((3, 3, 16, 64), "model", sizes) == P(None, None, None, "model")
    assert parallel.param_spec((64,), "model", sizes) == P()  # biases stay replicated
    assert parallel.param_spec((3, 3, 16, 64), "replicated", sizes) == P()


def test_layouts_that_cannot_work_are_config_errors():
    with pytest.raises(config_lib.ConfigError, match="mesh_shape"):
        experiment.setup_run(tiny_config("sharded", mesh=(3, -1)))
    with pytest.raises(config_lib.ConfigError, match="param_sharding"):
        config_lib.validate(tiny_config("pmap", param_sharding="fsdp"))
    config = tiny_config("sharded", mesh=(8, 1), accum=2)  # 8 / 8 devices = 1 per shard
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps"):
        experiment.check_batch_sizes(config, experiment.setup_run(config).layout)
    config = tiny_config("pmap")
    config.batch_size = 12
    with pytest.raises(config_lib.ConfigError, match="batch_size=12"):
        experiment.check_batch_sizes(config, experiment.setup_run(config).layout)


def test_distributed_starts_from_flags_or_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert not parallel.initialize_distributed() and not calls  # one process: nothing
    assert parallel.initialize_distributed("10.0.0.1:1234", 2, 1)
    assert parallel.initialize_distributed(auto=True)  # --distributed: TPU VM / SLURM
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # inside `srun` with two tasks
    assert parallel.initialize_distributed()
    assert calls == [("10.0.0.1:1234", 2, 1), (), ()]


def test_jit_pmap_and_sharded_meshes_give_the_same_training():
    """Single device vs pmap vs sharded (8x1 replicated, 4x2 FSDP, 2x4 model-parallel)."""
    assert jax.device_count() == 8
    batches = [fixed_batch()] * STEPS
    run, state, rng = compiled_run()
    reference = run_steps(run, state, batches, rng)
    assert reference[1][-1] < reference[1][0]  # it trains

    for mode, mesh, sharding in [("pmap", (-1, 1), "replicated"),
                                 ("sharded", (8, 1), "replicated"),
                                 ("sharded", (4, 2), "fsdp"),
                                 ("sharded", (2, 4), "model")]:
        other = experiment.setup_run(tiny_config(mode, mesh=mesh, param_sharding=sharding))
        result = run_steps(other, state, batches, rng)
        assert_same_training(reference, result, f"{mode} {mesh} {sharding}")

        if mode == "sharded":  # the state keeps its layout from step to step
            device_state = other.layout.put_state(state)
            device_state, _ = other.train_step(
                device_state, other.layout.put_batch(batches[0]),
                other.layout.put_replicated(rng))
            kernel = device_state.params["net"]["gsag"]["key_conv"]["kernel"]  # [3,3,32,4]
            momentum = jax.tree_util.tree_leaves(device_state.opt_state)
            expected = {"replicated": P(), "fsdp": P(None, None, "data", None),
                        "model": P(None, None, None, "model")}[sharding]
            assert kernel.shape == (3, 3, 32, 4)
            expected = NamedSharding(other.layout.mesh, expected)
            assert kernel.sharding.is_equivalent_to(expected, 4), kernel.sharding
            assert any(m.shape == kernel.shape and m.sharding.is_equivalent_to(expected, 4)
                       for m in momentum)


def test_gradient_accumulation_equals_one_big_batch():
    """k micro-batches, one update: the big batch's loss and update (frozen batch norm).

    The batch has uneven ignored pixels, so normalising each micro-batch by its own
    pixel count would differ; the step weights them by their share of the global count.
    """
    batches = [fixed_batch()] * 2
    run, state, rng = compiled_run(bn_mode="frozen")
    reference = run_steps(run, state, batches, rng)
    for mode, mesh, accum in [("jit", (-1, 1), 4), ("sharded", (4, 2), 2)]:
        other = experiment.setup_run(tiny_config(mode, mesh=mesh, bn_mode="frozen", accum=accum))
        result_state, losses = run_steps(other, state, batches, rng)
        np.testing.assert_allclose(losses, reference[1], rtol=RTOL)
        for x, y in zip(jax.tree_util.tree_leaves(reference[0].params),
                        jax.tree_util.tree_leaves(result_state.params)):
            np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL)
        print(f"accumulation {mode} k={accum}: max |diff| "
              f"{max_differences(reference[0], result_state)[0]:.2e}")


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer_state():
    batches = [fixed_batch()] * 2
    run32, state, rng = compiled_run(bn_mode="frozen")
    reference = run_steps(run32, state, batches, rng)
    run16 = experiment.setup_run(tiny_config(bn_mode="frozen", dtype="bfloat16"))
    result_state, losses = run_steps(run16, state, batches, rng)
    for tree in ("params", "opt_state", "batch_stats"):
        dtypes = {x.dtype for x in jax.tree_util.tree_leaves(getattr(result_state, tree))
                  if np.issubdtype(x.dtype, np.floating)}
        assert dtypes == {np.dtype(np.float32)}, (tree, dtypes)
    outputs = run16.model.apply({"params": result_state.params,
                                 "batch_stats": result_state.batch_stats},
                                batches[0]["image"][:1], train=False)
    assert outputs["logits"].dtype == jax.numpy.bfloat16  # the compute really is bf16
    np.testing.assert_allclose(losses, reference[1], rtol=2e-2)


def test_compile_effort_on_a_jax_without_the_option(monkeypatch):
    """JAX 0.11 (the lent GPU machine's) has no ``jax_exec_time_optimization_effort``:
    the default 0 needs nothing, another value stops with the key and the fix."""
    import types  # pylint: disable=import-outside-toplevel
    cfg = config_lib.base_config().parallel
    assert parallel.set_compile_effort(cfg) == 0.0  # this JAX: the option is set
    monkeypatch.setattr(parallel.jax, "config", types.SimpleNamespace())
    assert parallel.set_compile_effort(cfg) == 0.0
    cfg.exec_time_effort = -1.0
    with pytest.raises(config_lib.ConfigError, match="exec_time_effort=-1 needs JAX"):
        parallel.set_compile_effort(cfg)
