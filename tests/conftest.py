"""Test set-up: 8 fake CPU devices, so pmap and mesh paths run anywhere.

XLA reads the flag when JAX first starts a backend, so it is set before any test
module imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# XLA's CPU compiler is slow on threefry's unrolled hash: the counter-based 'rbg'
# generator (the default of `config.prng_impl`) compiles model inits 5x faster.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end (training runs in subprocesses, several processes, "
        "signals); left out of the fast lane `pytest -m 'not slow'`")
