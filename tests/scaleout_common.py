"""Shared pieces of the scale-out tests (test_parallel, test_multihost, test_resilience).

One tiny model (VGG16 layout at 1/16 width, one conv per block, GSAG 'basic' head whose
batch norm is trained, one scale, 25 px crops, constant learning rate), its compiled
jit reference (once per pytest process), the ``--config.*`` flags that give the same
config to ``python -m scaleattn.main``, and the environment of such subprocesses.
"""
import functools
import os
import subprocess
import sys

import flax
import jax
import numpy as np

from scaleattn import config as config_lib
from scaleattn import experiment, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 25


def tiny_config(mode: str = "jit", *, mesh=(-1, 1), param_sharding: str = "replicated",
                bn_mode: str = "train", accum: int = 1, dtype: str = "float32"):
    c = config_lib.recipe("demo:single")
    c.model.width, c.model.head, c.model.gsag_variant = 1 / 16, "gsag", "basic"
    c.model.gsag_channels, c.model.bn_mode, c.model.dtype = 64, bn_mode, dtype
    c.model.dropout = c.model.attention_dropout = 0.0
    c.data.crop_size = CROP
    c.optim.schedule, c.optim.base_lr = "constant", 0.01
    c.parallel.mode, c.parallel.mesh_shape = mode, tuple(mesh)
    c.parallel.param_sharding, c.parallel.fsdp_min_size = param_sharding, 0
    c.train.grad_accum_steps = accum
    return c


def demo_config_flags(config) -> list[str]:
    """``--config.a.b=v`` for every value of ``config`` that differs from configs/demo.py."""
    base = flatten(config_lib.recipe("demo"))
    return [f"--config.{key}={value}" for key, value in flatten(config).items()
            if base.get(key) != value]


def flatten(config) -> dict:
    return flax.traverse_util.flatten_dict(config.to_dict(), sep=".")


def fixed_batch(n: int = 8, size: int = CROP) -> dict:
    """One square of class ``i % 3 + 1`` per image; uneven ignored pixels over the batch."""
    rng = np.random.RandomState(0)
    label = np.zeros((n, size, size), np.int32)
    image = rng.randn(n, size, size, 3).astype(np.float32) * 0.1
    for i in range(n):
        y, x = rng.randint(0, size - 10, 2)
        label[i, y:y + 10, x:x + 10] = i % 3 + 1
        image[i, y:y + 10, x:x + 10, i % 3] += 2.0
    label[:3, :6] = 255
    return {"image": image, "label": label}


@functools.lru_cache(maxsize=None)
def _compiled(key: tuple):
    config = tiny_config(**dict(key))
    run = experiment.setup_run(config)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    return run, jax.device_get(experiment.initial_state(run, init_rng)), np.asarray(train_rng)


def compiled_run(**kwargs):
    """``(run, host initial state, train rng)`` of ``tiny_config(**kwargs)``, cached.

    The state and RNG are the ones `loop.train_and_evaluate` starts from.
    """
    return _compiled(tuple(sorted(kwargs.items())))


def run_steps(run, state, batches, rng) -> tuple[object, list[float]]:
    """Trains ``run`` from host ``state`` on host ``batches``; ``(host state, losses)``."""
    layout = run.layout
    device_state, device_rng = layout.put_state(state), layout.put_replicated(rng)
    losses = []
    for batch in batches:
        device_state, metrics = run.train_step(device_state, layout.put_batch(batch),
                                               device_rng)
        losses.append(loop.read_scalars(layout, metrics)["loss"])
    return jax.device_get(layout.host(device_state)), losses


def max_differences(a, b) -> tuple[float, float]:
    """Largest ``|a - b|`` and largest ``|a - b| / |a|`` (where ``|a| > 1e-3``) over two trees."""
    worst_abs = worst_rel = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = np.abs(x - y)
        if diff.size:
            worst_abs = max(worst_abs, float(diff.max()))
            big = np.abs(x) > 1e-3
            if big.any():
                worst_rel = max(worst_rel, float((diff[big] / np.abs(x[big])).max()))
    return worst_abs, worst_rel


def subprocess_env(devices: int) -> dict:
    """Environment of a ``python -m scaleattn.main`` child: CPU, ``devices`` fake devices;
    the session's other XLA flags and its compilation cache (conftest.py) are kept."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                CUDA_VISIBLE_DEVICES="", JAX_DEFAULT_PRNG_IMPL="rbg",
                XLA_FLAGS=" ".join(
                    [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
                    + [f"--xla_force_host_platform_device_count={devices}"]))


def main_command(config, workdir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scaleattn.main", "--config=configs/demo.py",
            f"--workdir={workdir}", *demo_config_flags(config), *extra]


def run_main(config, workdir, *extra: str, devices: int = 1,
             timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(config, workdir, *extra), cwd=REPO,
                          env=subprocess_env(devices), capture_output=True,
                          text=True, timeout=timeout)
