"""Install scaleattn: `pip install -e . -c constraints.txt` (add `[test]` for the test
suite, `[cuda]` for NVIDIA GPUs, `[tpu]` for Cloud TPUs). The ranges below are loose, for
use as a library; constraints.txt pins the tested versions."""
from setuptools import find_packages, setup

setup(
    name="scaleattn",
    version="0.1.0",
    description=("Multi-scale semantic segmentation with attention "
                 "(Attention to Scale, GSAG) in JAX/Flax."),
    packages=find_packages(include=["scaleattn", "scaleattn.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.2",
        "orbax-checkpoint>=0.6.0",
        "numpy>=1.24",
        "ml_collections>=0.1.1",
        "absl-py>=1.4",
        "pillow>=9.0",
        "scipy>=1.10",
        "tensorboardX>=2.6",
        # .safetensors weight files (scaleattn.pretrained); tested with 0.8, bfloat16 included.
        "safetensors>=0.8",
        # The data modules (and only they) need TensorFlow; a CPU build is enough.
        "tensorflow-cpu>=2.15",
        "tensorflow-datasets>=4.9.4",
        # tensorflow-datasets imports it when preparing a dataset but declares it only
        # for Python < 3.9 (tensorflow/datasets#11212).
        "importlib_resources",
    ],
    extras_require={
        # pytest-xdist: the suite runs on every core (`-n auto`), see docs/getting_started.md.
        # libtpu (jax[tpu], Linux x86-64 wheels only): its TPU compiler, for the pre-flight
        # tests that compile the demo for a v5e topology on the CPU (no TPU needed).
        "test": ["pytest>=7", "pytest-xdist>=3.5", "jax[tpu]>=0.4.30; sys_platform == 'linux'"],
        # Krähenbühl's C++ dense CRF, only to compare scaleattn.crf against
        # (tests/test_crf.py, benchmarks/crf_bench.py, benchmarks/crf_agreement.py); a source
        # package: needs a C++ compiler.
        "crf": ["pydensecrf2>=1.1"],
        # Accelerators: JAX with its CUDA 12 plugin and CUDA libraries (needs an NVIDIA
        # driver on the machine), or with libtpu. Without either, JAX runs on the CPU.
        "cuda": ["jax[cuda12]>=0.4.30"],
        "tpu": ["jax[tpu]>=0.4.30"],
    },
)
