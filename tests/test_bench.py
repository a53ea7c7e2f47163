"""Bench mode: MFU arithmetic, synthetic batches, no TensorFlow, the JAX/PyTorch table."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import compare


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_flops_of_a_single_conv_are_the_hand_count():
    b, h, w, cin, cout, k = 2, 16, 12, 8, 4, 3
    compiled = jax.jit(conv).lower(jnp.ones((b, h, w, cin)), jnp.ones((k, k, cin, cout))).compile()
    # 2 FLOPs (multiply + add) per tap, per output pixel and channel, per image.
    hand = b * 2 * (h - k + 1) * (w - k + 1) * cout * cin * k * k
    assert bench.compiled_flops(compiled) == hand


def test_mfu_is_flops_over_time_over_peak():
    flops = 2 * 14 * 10 * 4 * 8 * 9 * 2
    peak = bench.peak_flops("NVIDIA H100 80GB HBM3")
    assert peak == 989e12
    assert bench.mfu(flops, 1e-6, peak) == pytest.approx(flops / 1e-6 / 989e12)
    assert bench.mfu(989e12, 1.0, peak) == pytest.approx(1.0)
    assert bench.mfu(flops, 1e-6, None) is None and bench.mfu(None, 1.0, peak) is None


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 989e12), ("TPU v4", 275e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
                                        ("TPU v5p", 459e12), ("TPU v5", 459e12),
                                        ("cpu", None), ("NVIDIA A100-SXM4-40GB", None)])
def test_peak_table(kind, peak):
    assert bench.peak_flops(kind) == peak


def test_synthetic_batch_has_the_config_shape():
    batch = bench.synthetic_batch(3, 17, 5)
    assert batch["image"].shape == (3, 17, 17, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, 17, 17) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= set(range(5)) | {255}
    assert np.all(batch["label"][:, 0] == 255) and np.all(batch["label"][:, 5, 5] < 5)


BLOCK_TF = """
import sys
sys.modules["tensorflow"] = None           # any `import tensorflow` now fails
sys.modules["tensorflow_datasets"] = None
sys.modules["tensorboardX"] = None         # nor is it on the lent GPU machines
sys.argv = ["scaleattn.main"] + sys.argv[1:]
from scaleattn import main
try:
    main.run()
finally:
    assert not any(m.startswith("scaleattn.data.pipeline") for m in sys.modules)
"""


def test_bench_mode_runs_without_tensorflow(tmp_path):
    """Also without ImageNet weights: a paper config's bench needs none."""
    output = tmp_path / "bench.json"
    args = ["--config=configs/voc.py", "--mode=bench", f"--output={output}",
            f"--config.model.pretrained_dir={tmp_path / 'no_weights'}",
            "--config.model.width=0.0625", "--config.model.fc_width=32",
            "--config.model.depth=(1,1,1,1,1)",
            "--config.model.scales=(1.0,)", "--config.data.crop_size=17",
            "--config.batch_size=1", "--config.bench.steps=2", "--config.bench.warmup=0",
            "--config.bench.dtypes=float32", "--config.bench.dilated_convs=native,taps",
            f"--config.bench.profile_dir={tmp_path / 'profile'}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", BLOCK_TF, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["setup"]["batch_size"] == 1 and report["setup"]["crop_size"] == 17
    assert report["complete"] and "(1 rows, more to come)" in result.stderr
    row, taps_row = report["results"]
    assert (row["dilated_conv"], taps_row["dilated_conv"]) == ("native", "taps")
    assert row["dtype"] == "float32" and row["train_flops"] > row["eval_flops"] > 0
    assert row["train_images_per_s"] == pytest.approx(1 / row["train_step_s"])
    assert row["train_mfu"] is None  # CPU: no peak
    # Model FLOPs, by hand: one 17 x 17 image through conv1_1..conv5_1 (3x3; widths 4,
    # 8, 16, 32, 32 at 17, 9, 5, 3, 3 pixels), fc6 (3x3, 32 -> 2), fc7 (2 -> 2) and fc8
    # (2 -> 21 classes) at 3 x 3; 2 FLOPs per multiply-add; a train step is 3 forwards.
    forward = 2 * (17 * 17 * 3 * 4 * 9 + 9 * 9 * 4 * 8 * 9 + 5 * 5 * 8 * 16 * 9
                   + 3 * 3 * 16 * 32 * 9 + 3 * 3 * 32 * 32 * 9 + 3 * 3 * 32 * 2 * 9
                   + 3 * 3 * 2 * 2 + 3 * 3 * 2 * 21)
    for r in (row, taps_row):  # the same for both lowerings; XLA's counts differ
        assert (r["train_model_flops"], r["eval_model_flops"]) == (3 * forward, forward)
    assert row["train_flops"] != taps_row["train_flops"]
    assert row["num_params"] == taps_row["num_params"]
    # VGG's conv5 and fc6 are dilated: 'taps' leaves no dilated kernel behind
    assert row["train_convolutions"]["rhs_dilated"] > 0
    assert taps_row["train_convolutions"]["rhs_dilated"] == 0
    profile = row["train_profile"]
    assert profile and all(p["ms_per_call"] > 0 for p in profile)
    assert sum(p["share"] for p in profile) <= 1 + 1e-9
    assert [p["ms_per_call"] for p in profile] == sorted(
        (p["ms_per_call"] for p in profile), reverse=True)
    assert "| float32 | native |" in result.stdout and "| float32 | taps |" in result.stdout
    assert "n/a" in result.stdout and "where the time went" in result.stdout
    assert "train GFLOP/step (model)" in result.stdout and "(XLA)" in result.stdout


def fake_report(framework, train_s, eval_s, params=1000, flops=None, peak=None,
                model_flops=None):
    setup = {"config": "c", "backbone": "resnet101", "head": "aspp_v2", "width": 0.25,
             "depth": [1, 1, 2, 1], "scales": [1.0, 0.75, 0.5], "merge": "attention",
             "batch_size": 2, "crop_size": 65, "num_classes": 21, "device": "cpu",
             "platform": "cpu", "host_cores": 2, "jax": "0", "steps": 5, "warmup": 2,
             "peak_flops": peak, "torch": "2", "threads": 2, "channels_last": True,
             "compile": False, "framework": framework}
    row = {"dtype": "float32", "num_params": params, "train_step_s": train_s,
           "eval_step_s": eval_s, "train_images_per_s": 2 / train_s,
           "eval_images_per_s": 2 / eval_s, "compile_train_s": 3.0, "compile_eval_s": 1.0,
           "train_flops": flops, "train_mfu": None if peak is None else flops / train_s / peak}
    if model_flops is not None:  # reports since model FLOPs: MFU on them
        row.update(train_model_flops=model_flops, train_mfu=model_flops / train_s / peak)
    return {"setup": setup, "results": [row]}


def test_compare_gives_the_ratio_and_the_peer_mfu_from_the_same_flops():
    jax_report = fake_report("jax", 0.5, 0.2, flops=1e12, peak=989e12)
    torch_report = fake_report("torch", 1.0, 0.1)
    (row,) = compare.compare_rows(jax_report, torch_report)
    assert row["train_ratio"] == pytest.approx(2.0) and row["eval_ratio"] == pytest.approx(0.5)
    assert row["torch_train_mfu"] == pytest.approx(1e12 / 1.0 / 989e12)
    assert row["params_match"]
    text = compare.markdown([row], jax_report, torch_report)
    assert "| float32 | native | 4.00 | 2.00 | 2.00× | 10.00 | 20.00 | 0.50× |" in text
    other = fake_report("torch", 1.0, 0.1, params=999)
    assert not compare.compare_rows(jax_report, other)[0]["params_match"]
    # a report with model FLOPs: both MFUs on them, not on XLA's executed count
    jax_report = fake_report("jax", 0.5, 0.2, flops=1e12, peak=989e12, model_flops=6e11)
    (row,) = compare.compare_rows(jax_report, torch_report)
    assert row["jax_train_mfu"] == pytest.approx(6e11 / 0.5 / 989e12)
    assert row["torch_train_mfu"] == pytest.approx(6e11 / 1.0 / 989e12)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet101"])
def test_torch_peer_computes_the_same_function(backbone):
    """With the JAX model's weights, the PyTorch peer gives the same outputs (fp32)."""
    torch = pytest.importorskip("torch")
    import torch_peer  # pylint: disable=import-outside-toplevel
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
    from scaleattn.models import build_model  # pylint: disable=import-outside-toplevel
    config = config_lib.recipe("voc" if backbone == "vgg16" else "voc_r101")
    m = config.model
    m.width, m.num_classes, m.fc6_dilation, m.scales = 1 / 16, 5, 2, (1.0, 0.75)
    m.depth = (1, 1, 1, 1, 1) if backbone == "vgg16" else (1, 1, 2, 1)
    m.aspp_rates = (1, 2)
    model = build_model(m)
    images = np.random.default_rng(0).standard_normal((2, 33, 33, 3)).astype(np.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(
        {"params": jax.random.PRNGKey(0)}, images)
    # Non-trivial batch-norm statistics, so that they must be copied too.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "batch_stats" in jax.tree_util.keystr(p) else x, variables)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    peer = torch_peer.MultiScaleSegmenter(m)
    torch_peer.load_flax(peer, jax.device_get(variables))
    peer.eval()
    with torch.no_grad():
        merged, scale_logits = peer(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(merged.permute(0, 2, 3, 1).numpy(), out["logits"],
                               rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(out["scale_logits"], scale_logits):
        np.testing.assert_allclose(theirs.permute(0, 2, 3, 1).numpy(), ours, rtol=1e-4,
                                   atol=1e-4)


def test_best_of_rounds_keeps_the_fastest_steps():
    slow, fast_train = fake_report("jax", 1.0, 0.1), fake_report("jax", 0.5, 0.4)
    best = compare.best_of([slow, fast_train])
    (row,) = best["results"]
    assert row["train_step_s"] == 0.5 and row["train_images_per_s"] == 4.0
    assert row["eval_step_s"] == 0.1 and row["eval_images_per_s"] == pytest.approx(20.0)
    assert best["setup"]["rounds"] == 2


def test_convolution_windows_show_kernel_dilation():
    def f(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((4, 4), (4, 4)), rhs_dilation=(4, 4),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    text = jax.jit(f).lower(jnp.ones((1, 9, 9, 2)), jnp.ones((3, 3, 2, 2))).compile().as_text()
    assert bench.convolution_windows(text) == {"count": 1, "rhs_dilated": 1,
                                               "windows": {"size=3x3 rhs_dilate=4x4": 1}}


def test_fold_frozen_bn_sweep_config_and_column():
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.recipe("voc_r101")
    assert bench.bench_config(config, "float32").model.fold_frozen_bn is True
    assert bench.bench_config(config, "float32", None, False).model.fold_frozen_bn is False
    config.bench.fold_frozen_bn = "true,false"
    config_lib.validate(config)
    config.bench.fold_frozen_bn = "true,no"
    with pytest.raises(config_lib.ConfigError, match="bench.fold_frozen_bn"):
        config_lib.validate(config)
    report = fake_report("jax", 0.5, 0.2)
    report["setup"].update(cpus_allowed=2)
    row = dict(report["results"][0], dilated_conv="native", fold_frozen_bn=False,
               eval_mfu=None, train_step_memory_bytes=None, peak_memory_bytes=None)
    report["results"] = [row, dict(row, fold_frozen_bn=True)]
    text = bench.table(report)
    assert "| float32 | native | no | 3.0 / 1.0 |" in text
    assert "| float32 | native | yes | 3.0 / 1.0 |" in text
