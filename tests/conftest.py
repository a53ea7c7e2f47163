"""Test set-up: 8 fake CPU devices, so pmap and mesh paths run anywhere; XLA flags
that compile the tiny test models fast; the `slow` marker, run first; fixtures shared
by the test modules (the demo data folder, a tiny demo config).

XLA reads its flags when JAX first starts a backend, so they are set before any test
module imports jax, once, in the first process to load this file (the xdist controller);
the workers and the training runs the tests start in subprocesses inherit them.
"""
import os
import subprocess
import sys

import pytest

# The tests' models are tiny: XLA's CPU compiler, not the running, takes their time.
# Without LLVM's optimisations, with XLA's older (simpler) fusion code generator and one
# LLVM module per program, the suite compiles about twice as fast; the programs compute
# the same operations.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_cpu_use_fusion_emitters=false",
                      "--xla_cpu_parallel_codegen_split_count=1")


def xla_accepts(flags: str) -> bool:
    """Whether this jaxlib's XLA knows every flag in ``flags`` (an unknown one is fatal)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), capture_output=True,
        timeout=300, check=False)
    return probe.returncode == 0


CREATED_CACHE_DIR = None  # set in the process that made the session's cache folder

if "SCALEATTN_TEST_SETUP" not in os.environ:
    os.environ["SCALEATTN_TEST_SETUP"] = "1"
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    if xla_accepts(" ".join((flags, *FAST_COMPILE_FLAGS))):
        flags = " ".join((flags, *FAST_COMPILE_FLAGS))
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # XLA's CPU compiler is slow on threefry's unrolled hash: the counter-based 'rbg'
    # generator (the default of `config.prng_impl`) compiles model inits 5x faster.
    os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
    # One persistent compilation cache for the whole session, shared by the pytest
    # workers and the subprocesses: the many identical tiny models are compiled once.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import tempfile  # pylint: disable=import-outside-toplevel
        CREATED_CACHE_DIR = tempfile.mkdtemp(prefix="scaleattn_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = CREATED_CACHE_DIR
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end (training runs in subprocesses, several processes, "
        "signals); left out of the fast lane `pytest -m 'not slow'`")


def pytest_unconfigure(config):
    """The session's compilation cache goes with the session."""
    del config
    if CREATED_CACHE_DIR:
        import shutil  # pylint: disable=import-outside-toplevel
        shutil.rmtree(CREATED_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The slow tests first (stable order otherwise): on few cores the long end-to-end
    runs then overlap the many short tests instead of finishing the session alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
