"""run.json records, the Markdown report, and bit-identical reruns on CPU."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import demo_runs
from scaleattn import config as config_lib
from scaleattn import report, train


def record(name, miou, **config_changes):
    config = config_lib.voc_config(**config_changes) if name.startswith("voc") else \
        config_lib.recipe("demo")
    return {"name": name, "commit": "abc123def456", "steps": 6000, "miou": miou,
            "pixel_accuracy": 0.9, "miou_ms_flip": None if miou is None else miou + 0.01,
            "wall_time_s": 5400.0, "device": "NVIDIA H100 80GB HBM3 x1",
            "params_sha256": "f" * 64, "config": json.loads(config.to_json())}


def test_table_has_one_row_per_run_next_to_the_paper(tmp_path):
    runs = [dict(record("voc_vgg16_s3_attention", 0.7123), workdir="/x/attn"),
            dict(record("voc_vgg16_baseline_noextra", 0.6301, scales=(1.0,)), workdir="/x/b"),
            dict(record("voc_resnet101_s3_attention", None, backbone="resnet101"),
                 workdir="/x/r"),
            dict(record("demo_attention", 0.5), workdir="/x/demo/")]
    lines = report.markdown_table(runs).splitlines()
    assert lines[0].startswith("| run | config | commit | steps | mIoU | mIoU ms+flip |")
    assert len(lines) == 2 + 4
    assert lines[2] == ("| attn | voc_vgg16_s3_attention | `abc123def456` | 6000 | 71.23 | 72.23 "
                        "| 90.0 min | NVIDIA H100 80GB HBM3 x1 | `ffffffffffff` | — | 75.70 | "
                        "LargeFOV-CRF + attention + extra supervision, VOC test (76.3 with "
                        "COCO) |")
    assert "| 63.01 | 64.01 |" in lines[3] and "| 62.25 | — |" in lines[3]
    assert "| — | — |" in lines[4] and "| 77.00 | — |" in lines[4]
    assert lines[5].startswith("| demo | demo_attention |") and lines[5].endswith(
        "| — | — | — |")


def test_report_command_reads_workdirs(tmp_path, capsys):
    for name in ("a", "b"):
        report.write_run(str(tmp_path / name), record("demo_attention", 0.25))
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"),
                        f"--output={tmp_path / 'table.md'}"]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "table.md").read_text()
    assert "| a | demo_attention |" in printed and "| b | demo_attention |" in printed
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "missing/run.json does not exist" in capsys.readouterr().err


def test_tree_digest_sees_every_bit():
    tree = {"a": jnp.arange(4.0), "b": {"c": np.ones((2, 2), np.int32)}}
    same = {"a": jnp.arange(4.0), "b": {"c": np.ones((2, 2), np.int32)}}
    assert report.tree_digest(tree) == report.tree_digest(same)
    flipped = np.arange(4.0, dtype=np.float32)
    flipped.view(np.uint32)[2] ^= 1  # the last bit of one value
    assert report.tree_digest({"a": flipped, "b": same["b"]}) != report.tree_digest(tree)


def tiny_demo_config(data_dir):
    c = demo_runs.tiny_demo_config(data_dir, images=(8, 4), crop=32, fc_width=32, batch=4,
                                   steps=3, log_every=3, checkpoint_every=3)
    c.predict.summary_images = 1
    return c


@pytest.fixture
def compilation_cache(tmp_path):
    """JAX's persistent compilation cache in ``tmp_path`` for one test, then off again.

    The second of two identical runs then loads the executables the first compiled
    (XLA's CPU compiler is deterministic; this only saves the time of compiling twice).
    """
    from jax.experimental.compilation_cache import compilation_cache as cache
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    cache.reset_cache()
    jax.config.update(keys[0], str(tmp_path / "xla_cache"))
    jax.config.update(keys[1], 0.0)
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    cache.reset_cache()


def test_same_seed_and_config_give_bit_identical_runs(tmp_path, compilation_cache):
    del compilation_cache
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path / name
        scores = train.train_and_evaluate(tiny_demo_config(tmp_path / "data"), str(workdir))
        runs.append(json.loads((workdir / "run.json").read_text()))
        assert runs[-1]["miou"] == scores["miou"]
    first, second = runs
    assert first["steps"] == 3 and first["name"] == "demo_attention"
    assert first["wall_time_s"] > 0 and first["device"].startswith("cpu")
    assert 0 <= first["miou"] <= 1 and len(first["params_sha256"]) == 64
    for key in ("miou", "pixel_accuracy", "params_sha256", "config", "commit"):
        assert first[key] == second[key], key
    assert "eval_images/0" in image_tags(tmp_path / "first" / "tensorboard")


def image_tags(folder) -> set:
    """Tags of the image summaries in a TensorBoard folder."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tags = set()
    for name in folder.iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(name)):
            tags |= {v.tag for v in event.summary.value if v.HasField("image")}
    return tags
