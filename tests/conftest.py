"""Test set-up: 8 fake CPU devices, so pmap and mesh paths run anywhere; the
`slow` marker; fixtures shared by the test modules (the demo data folder, a tiny
demo config, JAX's compilation cache).

XLA reads the flag when JAX first starts a backend, so it is set before any test
module imports jax.
"""
import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# XLA's CPU compiler is slow on threefry's unrolled hash: the counter-based 'rbg'
# generator (the default of `config.prng_impl`) compiles model inits 5x faster.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# One persistent compilation cache for the whole session, shared by the pytest workers
# and the training runs the tests start in subprocesses (they inherit the variables):
# the many identical tiny models are compiled once. Set in the first process to load
# this file (the xdist controller), before the workers start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile  # pylint: disable=import-outside-toplevel
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="scaleattn_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end (training runs in subprocesses, several processes, "
        "signals); left out of the fast lane `pytest -m 'not slow'`")


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """One folder for the demo datasets of the session (of each pytest worker): every
    size (train / val image counts) is generated once, by the first test that needs it."""
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="session")
def tiny_demo_config(demo_data_dir):
    """``tiny_demo_config(images=(train, val), crop=..., fc_width=..., batch=...,
    steps=..., log_every=..., checkpoint_every=..., data_dir=demo_data_dir)``: the demo
    recipe shrunk for end-to-end tests (width 1/16, one device with jit, no evaluation
    during training; pmap and sharded runs are compared in test_parallel.py)."""
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel

    def make(*, images, crop, fc_width, batch, steps, log_every, checkpoint_every,
             data_dir=None):
        c = config_lib.recipe("demo")
        c.data.data_dir = str(data_dir or demo_data_dir)
        c.data.demo_train_size, c.data.demo_val_size = images
        c.data.crop_size = crop
        c.model.width, c.model.fc_width = 1 / 16, fc_width
        c.batch_size, c.eval.batch_size = batch, batch
        c.train.steps, c.train.log_every = steps, log_every
        c.train.checkpoint_every, c.train.eval_every = checkpoint_every, 0
        c.parallel.mode = "jit"
        return c
    return make


@pytest.fixture
def compilation_cache(tmp_path):
    """JAX's persistent compilation cache in ``tmp_path`` for one test, then off again.

    The second of two identical runs then loads the executables the first compiled
    (XLA's CPU compiler is deterministic; this only saves the time of compiling twice).
    """
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=import-outside-toplevel
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    cache.reset_cache()
    jax.config.update(keys[0], str(tmp_path / "xla_cache"))
    jax.config.update(keys[1], 0.0)
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    cache.reset_cache()
