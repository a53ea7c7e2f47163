"""--mode=preflight: the demo's steps compiled for a Cloud TPU topology (libtpu's TPU
compiler on this CPU host, no TPU), the JSON it writes, an oversized batch that does
not fit, and the arithmetic around the compiler (roofline, affine batch fit, parsing
of XLA's messages and HLO)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

REQUIRED_KEYS = (
    "config", "topology", "chips", "hosts", "device_kind", "step", "global_batch", "dtype",
    "param_sharding", "lower_s", "compile_s", "argument_bytes", "output_bytes", "temp_bytes",
    "code_bytes", "peak_bytes_per_chip", "hbm_bytes_per_chip", "fits", "flops_per_chip",
    "model_flops_per_chip", "est_step_s", "est_basis", "xla_optimal_s", "est_img_per_s",
    "est_mfu", "collectives", "jax", "libtpu")


# ---- without compiling ---------------------------------------------------------------

def test_chip_table_and_topology_names():
    assert preflight.chip_of("v5e:2x2").device_kind == "TPU v5 lite"
    assert preflight.chip_of("v4:2x2x2").chip_config == "megacore"
    for chip in preflight.CHIPS:
        assert chip.source.startswith(("https://cloud.google.com/tpu/docs/",
                                       "https://www.nvidia.com/"))
        assert 8 * GiB < chip.hbm_bytes < 128 * GiB and 1e14 < chip.peak_bf16_flops < 1e16
    assert preflight.chip_of("h100:8").platform == "cuda"
    for bad in ("v5e", "v9:2x2", "v5e:2by2", "h100:2x2", "h100:0"):
        with pytest.raises(preflight.PreflightError, match="--topology"):
            preflight.chip_of(bad)


def test_gpu_topology_without_the_cuda_plugin_says_what_to_install():
    if importlib.util.find_spec("jax_cuda12_plugin") is not None:
        pytest.skip("JAX's CUDA plugin is installed here")
    with pytest.raises(preflight.PreflightError,
                       match=rf"h100:2 needs JAX's CUDA plugin .* pip install "
                             rf"jax-cuda12-plugin=={jax.__version__} "
                             rf"jax-cuda12-pjrt=={jax.__version__}"):
        preflight.topology_devices("h100:2")


def test_roofline_takes_the_slower_of_compute_and_memory():
    chip = preflight.chip_of("v5e:2x2")  # 197e12 FLOP/s, 819e9 B/s
    seconds, basis = preflight.roofline(197e12, 819e9 / 2, chip)
    assert seconds == pytest.approx(1.0) and basis.startswith("compute")
    seconds, basis = preflight.roofline(197e12 / 4, 819e9, chip)
    assert seconds == pytest.approx(1.0) and basis.startswith("memory")
    assert preflight.roofline(None, None, chip) == (None, "none")


def test_affine_batch_solves_the_line_for_the_hbm():
    # 1 GiB fixed + 0.5 GiB per image: 16 GiB holds 30 images; in steps of 4: 28
    points = [(2, 2 * GiB), (6, 4 * GiB)]
    fit = preflight.affine_batch(points, 16 * GiB, unit=1)
    assert fit["fixed_bytes"] == pytest.approx(GiB) and fit["per_chip"] == 30
    assert preflight.affine_batch(points, 16 * GiB, unit=4)["per_chip"] == 28
    assert preflight.affine_batch(points, GiB // 2, unit=1)["per_chip"] == 0


class FakeLayout:
    """A `preflight.Preflight` stand-in whose train step needs ``fixed + per_image * b``
    bytes per chip at per-chip batch ``b``, plus ``bend`` beyond ``knee`` images (XLA's
    memory is not exactly affine near the limit): the search's arithmetic, without
    compiling."""

    def __init__(self, sharding, fixed, per_image, *, shards=4, accum=1, bend=0, knee=10**9):
        self.target = types.SimpleNamespace(mode="sharded", param_sharding=sharding,
                                            batch_shards=shards)
        self.config = types.SimpleNamespace(train=types.SimpleNamespace(
            grad_accum_steps=accum))
        self.chip = types.SimpleNamespace(hbm_bytes=16 * GiB)
        self.fixed, self.per_image, self.bend, self.knee = fixed, per_image, bend, knee
        self.compiled = []

    def compile(self, step, global_batch):
        assert step == "train"
        b = global_batch // self.target.batch_shards
        self.compiled.append(b)
        peak = self.fixed + self.per_image * b + (self.bend if b > self.knee else 0)
        return {"per_chip_batch": b, "peak_bytes_per_chip": peak,
                "fits": peak <= self.chip.hbm_bytes}


def test_largest_batch_fits_a_line_and_confirms_the_best_sharding():
    own = FakeLayout("replicated", 4 * GiB, GiB // 2, bend=GiB, knee=20)
    fsdp = FakeLayout("fsdp", 2 * GiB, GiB // 2, bend=GiB, knee=20)
    rows = preflight.largest_batch([own, fsdp], own.compile("train", 4 * 2), log=lambda _: None)
    # replicated: (16 - 4) / 0.5 = 24 per chip, fsdp: 28; 28 is more than MAX_GROWTH (8)
    # times the 2 compiled, so 16 is compiled first (fits; the line through it says 28
    # again); the bend past 20 images costs 1 GiB, so fsdp confirms at 26 per chip (one
    # compile at 28, then 27, 26)
    assert [r["predicted_per_chip"] for r in rows] == [24, 28]
    assert rows[0]["largest_batch"] is None and rows[1]["largest_batch"] == 26 * 4
    assert own.compiled == [2, 4] and fsdp.compiled == [2, 16, 28, 27, 26]
    assert rows[1]["largest_batch_is_lower_bound"] is False
    assert rows[1]["fixed_bytes"] == pytest.approx(2 * GiB)


def test_largest_batch_from_a_batch_that_does_not_fit():
    """The config's batch is over the HBM: the second point is half of it; steps of
    ``grad_accum_steps`` images per shard."""
    own = FakeLayout("replicated", GiB, GiB, accum=2)
    rows = preflight.largest_batch([own], own.compile("train", 4 * 20), log=lambda _: None)
    assert own.compiled == [20, 10, 14] and rows[0]["largest_batch"] == 14 * 4


def test_oom_message_and_collectives_are_read():
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
               "memory space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")
    assert preflight.oom_bytes(message) == (int(20.5 * GiB), int(15.75 * GiB))
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (72.76G) exceeds available HBM (15.75G).")
    assert preflight.oom_bytes(message) == (int(72.76 * GiB), int(15.75 * GiB))
    assert preflight.oom_bytes("some other error") == (None, None)
    hlo = "\n".join([
        "  %all-reduce.1 = f32[1024,3]{1,0} all-reduce(f32[1024,3]{1,0} %p), to_apply=%add",
        "  %ag = (bf16[8]{0}, bf16[32]{0}) all-gather-start(bf16[8]{0} %x), dimensions={0}",
        "  %agd = bf16[32]{0} all-gather-done((bf16[8]{0}, bf16[32]{0}) %ag)",
        "  %t = (f32[4]{0}, s32[2]{0}) all-reduce(f32[4]{0} %a, s32[2]{0} %b)",
        "  %add.2 = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %a)"])
    found = preflight.collectives(hlo)
    assert found["all-reduce"] == {"count": 2, "bytes": 1024 * 3 * 4 + 4 * 4 + 2 * 4}
    assert found["all-gather"] == {"count": 1, "bytes": 32 * 2}
    assert found["reduce-scatter"] == {"count": 0, "bytes": 0}


# ---- the pmap program, written as shard_map -----------------------------------------

def test_pmap_target_computes_what_pmap_computes():
    """On the 8 CPU devices: the shard_map program the pre-flight compiles for a pmap
    config takes the same train step as `jax.pmap` (trained, synchronised batch norm:
    the collectives run over the same axis name)."""
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
    from scaleout_common import compiled_run, fixed_batch, run_steps, tiny_config
    run, state, rng = compiled_run(mode="pmap")
    batch = fixed_batch()
    expected, losses = run_steps(run, state, [batch], rng)
    config = tiny_config("pmap")
    target = preflight.make_target(config.parallel, jax.devices())
    assert (target.chips, target.batch_shards, target.param_sharding) == (8, 8, "replicated")
    steps = preflight.build_steps(config, target)
    step = target.compile_step(steps.train_fn)
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(target.mesh, spec))
    args = (put(state, PartitionSpec()), put(batch, PartitionSpec("batch")),
            put(rng, PartitionSpec()))
    new_state, metrics = step.lower(*args).compile()(*args)
    assert float(metrics["loss"]) == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(new_state)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- compiled for v5e:2x2 -------------------------------------------------------------

if importlib.util.find_spec("libtpu") is None:
    if sys.platform == "linux":
        raise ImportError("tests/test_preflight.py needs libtpu: pip install -e '.[test]' "
                          "installs it (jax[tpu])")
    pytestmark = pytest.mark.skip("libtpu has Linux wheels only")

@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    """The command line on the demo config (pmap over 4 v5e chips): its JSON rows and
    printed summary."""
    output = tmp_path_factory.mktemp("preflight") / "demo.json"
    result = subprocess.run(
        [sys.executable, "-m", "scaleattn.main", "--config=configs/demo.py",
         "--mode=preflight", "--topology=v5e:2x2", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result.stdout


@pytest.mark.slow
def test_demo_train_and_eval_steps_fit_v5e(demo_rows):
    rows, stdout = demo_rows
    train, evaluation = rows
    config = config_lib.recipe("demo")
    for row, step, batch in ((train, "train", config.batch_size),
                             (evaluation, "eval", config.eval.batch_size)):
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["step"] == step and row["global_batch"] == batch and row["fits"] is True
        assert (row["config"], row["topology"], row["chips"], row["hosts"]) == (
            "demo_attention", "v5e:2x2", 4, 1)
        assert row["device_kind"] == "TPU v5 lite" and row["hbm_bytes_per_chip"] == 16e9
        assert (row["parallel_mode"], row["param_sharding"], row["dtype"]) == (
            "pmap", "replicated", "float32")
        assert row["peak_bytes_per_chip"] == (row["argument_bytes"] + row["output_bytes"]
                                              - row["alias_bytes"] + row["temp_bytes"]
                                              + row["code_bytes"])
        assert 0 < row["peak_bytes_per_chip"] < row["hbm_bytes_per_chip"]
        # the estimate is the roofline of XLA's own counts, and says so
        seconds = max(row["flops_per_chip"] / 197e12, row["bytes_accessed_per_chip"] / 819e9)
        assert row["est_step_s"] == pytest.approx(seconds)
        assert row["est_img_per_s"] == pytest.approx(batch / seconds)
        assert row["est_mfu"] == pytest.approx(
            row["model_flops_per_chip"] / seconds / 197e12)
        assert row["estimate"] == "compiler estimate, not a measurement"
        assert row["jax"] and row["libtpu"] and row["compile_s"] > 0
        assert row["exec_time_effort"] == 0.0  # XLA's default
    # the state is donated: the new state aliases it; the eval step keeps it
    assert train["alias_bytes"] > 0 and evaluation["alias_bytes"] == 0
    # pmap's gradient sum: all-reduces of at least the float32 parameters' bytes
    shapes = preflight.Preflight.create(config, "v5e:2x2").steps.state_shapes.params
    param_bytes = sum(4 * x.size for x in jax.tree.leaves(shapes))
    assert param_bytes <= train["collectives"]["all-reduce"]["bytes"] < 3 * param_bytes
    # XLA executes at least the model's FLOPs (the analytic count: per chip, 2 of 8 images)
    assert train["flops_per_chip"] > 0.9 * train["model_flops_per_chip"] > 0
    assert "compiler estimate, not a measurement" in stdout and "fits" in stdout


@pytest.mark.slow
def test_exec_time_effort_reaches_the_tpu_compiler(demo_rows, tmp_path):
    """``parallel.exec_time_effort=-1`` is handed to XLA: the rows record it, and the
    compiled train step is another program (less fusion: more HBM traffic) computing
    the same FLOPs; the summary says which effort was used."""
    output = tmp_path / "fast.json"
    result = subprocess.run(
        [sys.executable, "-m", "scaleattn.main", "--config=configs/demo.py",
         "--mode=preflight", "--topology=v5e:2x2", f"--output={output}",
         "--config.parallel.exec_time_effort=-1"],
        cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fast, default = json.loads(output.read_text()), demo_rows[0]
    assert [r["exec_time_effort"] for r in fast] == [-1.0, -1.0]
    assert "exec_time_optimization_effort -1" in result.stdout
    train, train_default = fast[0], default[0]
    assert train["flops_per_chip"] == pytest.approx(train_default["flops_per_chip"], rel=0.01)
    assert train["bytes_accessed_per_chip"] != train_default["bytes_accessed_per_chip"]
    assert train["fits"] is True


@pytest.mark.slow
def test_oversized_batch_does_not_fit(tmp_path):
    """Two thousand 512x512 demo images per chip need far more than 16 GB: the row says
    fits: false with the bytes XLA asked for, and the command exits with one line naming
    the chip's HBM and the bytes needed."""
    output = tmp_path / "big.json"
    result = subprocess.run(
        [sys.executable, "-m", "scaleattn.main", "--config=configs/demo.py",
         "--mode=preflight", "--topology=v5e:2x2", f"--output={output}",
         "--config.data.crop_size=512", "--config.data.eval_size=512",
         "--config.batch_size=8192", "--config.eval.batch_size=8192"],
        cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: demo_attention does not fit v5e:2x2: the train step at batch "
                        r"8192 needs [\d.]+ GiB per chip, a v5e chip has 14.90 GiB HBM; .*",
                        last), last
    train = json.loads(output.read_text())[0]
    assert train["fits"] is False and train["peak_bytes_per_chip"] > 16e9


def test_largest_batch_never_follows_the_line_far_past_a_compile():
    """A tiny model is compiled at 8x the largest batch so far, the line refitted through
    each point. 1 GiB fixed, 1 MiB per image: the line from batches 2 and 4 says 15,360
    per chip; 32, 256 and 2,048 are compiled on the way, then 15,360 is confirmed. With
    64 KiB per image (245,760) `MAX_REFITS` runs out: the row gives the largest batch
    compiled, 16,384, and says it is a lower bound."""
    own = FakeLayout("replicated", GiB, 2**20, shards=1)
    rows = preflight.largest_batch([own], own.compile("train", 2), log=lambda _: None)
    assert rows[0]["predicted_per_chip"] == 15_360
    assert own.compiled == [2, 4, 32, 256, 2048, 15_360]
    assert rows[0]["largest_batch"] == 15_360 and not rows[0]["largest_batch_is_lower_bound"]
    own = FakeLayout("replicated", GiB, 2**16, shards=1)
    rows = preflight.largest_batch([own], own.compile("train", 2), log=lambda _: None)
    assert rows[0]["predicted_per_chip"] == 245_760
    assert own.compiled == [2, 4, 32, 256, 2048, 16_384]
    assert rows[0]["largest_batch"] == 16_384 and rows[0]["largest_batch_is_lower_bound"]


def test_largest_batch_bisects_when_the_line_is_far_off():
    """Memory jumps by 6 GiB past 12 images (a layout change in the compiler): the line
    through 2 and 4 says 24 per chip; 24, 23 and 22 do not fit, then bisection between
    the largest that fits (4) and 22 finds 12 in a few compiles, not one per image."""
    own = FakeLayout("replicated", 4 * GiB, GiB // 2, shards=1, bend=6 * GiB, knee=12)
    rows = preflight.largest_batch([own], own.compile("train", 2), log=lambda _: None)
    assert own.compiled[:5] == [2, 4, 24, 23, 22]
    assert rows[0]["largest_batch"] == 12 and len(own.compiled) <= 10
    assert all(b <= 12 or not own.compile("train", b)["fits"] for b in list(own.compiled))
