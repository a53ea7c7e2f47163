"""The input-pipeline benchmark on a tiny synthetic VOC (`fake_voc` + the real builder).

The builder's handling of fake_voc archives is tested in test_voc.py (which
builds its trees with fake_voc's writers); here only the realistic generator's
split layout and the benchmark's result are checked.
"""

import json
import tempfile

import numpy as np
import PIL.Image
import pytest

from benchmarks import fake_voc, input_pipeline

NUM_TRAIN_AUG, NUM_VAL = 8, 6
SIZE = (64, 48)  # width, height


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("input_pipeline")
    with pytest.MonkeyPatch.context() as patch:  # TFDS's empty mkdtemp folders
        patch.setattr(tempfile, "tempdir", str(work))
        return input_pipeline.build_synthetic(str(work), NUM_TRAIN_AUG, NUM_VAL, image_size=SIZE)


def test_synthetic_examples_are_deterministic_and_voc_like():
    image = fake_voc.synthetic_image("2009_000003", 48, 64, seed=1)
    voc_mask, sbd_label = fake_voc.synthetic_masks("2009_000003", 48, 64, seed=1)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, fake_voc.synthetic_image("2009_000003", 48, 64, seed=1))
    assert not np.array_equal(image, fake_voc.synthetic_image("2009_000004", 48, 64, seed=1))
    assert 255 in voc_mask and 255 not in sbd_label and sbd_label.max() > 0
    assert set(np.unique(voc_mask)) <= set(range(21)) | {255}
    # The 255 border replaces labels only; elsewhere VOC and SBD labels agree.
    keep = voc_mask != 255
    np.testing.assert_array_equal(voc_mask[keep], sbd_label[keep])


def test_synthetic_splits_match_the_real_layout():
    splits = fake_voc.synthetic_splits(NUM_TRAIN_AUG, NUM_VAL)
    sbd_only = set(splits["sbd_train"] + splits["sbd_val"]) - set(splits["voc_train"]) - set(
        splits["voc_val"])
    assert len(splits["voc_train"]) + len(sbd_only) == NUM_TRAIN_AUG
    assert len(splits["voc_val"]) == NUM_VAL
    # SBD also lists VOC ids, which the builder must de-duplicate / exclude.
    assert set(splits["sbd_train"]) & set(splits["voc_train"])
    assert set(splits["sbd_val"]) & set(splits["voc_val"])


def test_benchmark_result(data_dir, tmp_path):
    config = input_pipeline.voc_data_config(data_dir)
    result = input_pipeline.benchmark(config, crop_sizes=(33,), batch_size=4, eval_size=65,
                                   seconds=0.2, warmup_seconds=0.05, repeats=2, stages=True)
    assert result["dataset"]["train_examples"] == NUM_TRAIN_AUG
    assert result["dataset"]["eval_examples"] == NUM_VAL
    assert result["host"]["cpus"] >= 1 and len(result["host"]["loadavg_end"]) == 3
    assert [(input_pipeline.row_name(r), r["size"], r["batch_size"])
            for r in result["results"]] == [
        ("stage/read", 33, 4), ("stage/decode", 33, 4), ("stage/rescale", 33, 4),
        ("train/host", 33, 4), ("train/device", 33, 4), ("eval", 65, 4)]
    assert result["results"][4]["canvas"] == 65
    stages = {row["stage"]: row for row in result["breakdown"]}
    assert list(stages) == ["read", "decode", "rescale", "host", "device"]
    rates = {r.get("stage", r.get("augment_on")): r["mean_images_per_cpu_s"]
             for r in result["results"][:5]}
    for stage, before in (("decode", "read"), ("host", "rescale"), ("device", "decode")):
        assert stages[stage]["stage_cpu_ms_per_image"] == pytest.approx(
            1e3 * (1 / rates[stage] - 1 / rates[before]))
    assert stages["read"]["stage_cpu_ms_per_image"] == pytest.approx(1e3 / rates["read"])
    for row in result["results"]:
        for key in ("images_per_s", "images_per_cpu_s", "cpus_busy", "load1"):
            assert len(row[key]) == 2, key
        assert all(rate > 0 for rate in row["images_per_s"] + row["images_per_cpu_s"])
        assert row["mean_images_per_s"] == pytest.approx(np.mean(row["images_per_s"]))
        assert row["mean_images_per_cpu_s"] == pytest.approx(np.mean(row["images_per_cpu_s"]))
    json.dumps(result)  # JSON-able as written by --output
    table = input_pipeline.format_table(result)
    for name in ("train/host", "train/device", "eval", "stage/decode", "+ random rescale"):
        assert name in table
    assert "consumes 60.0 img/s" in input_pipeline.consumer_line(result, 30, 0.5)


def test_breakdown_arithmetic():
    rows = input_pipeline.breakdown({"read": 1000.0, "decode": 100.0, "rescale": 50.0,
                                  "host": 40.0, "device": 80.0})
    ms = {row["stage"]: row["stage_cpu_ms_per_image"] for row in rows}
    assert ms == pytest.approx({"read": 1.0, "decode": 9.0, "rescale": 10.0, "host": 5.0,
                                "device": 2.5})
    assert rows[1]["stage_images_per_cpu_s"] == pytest.approx(1000 / 9)
    assert rows[3]["cumulative_images_per_cpu_s"] == 40.0


def test_check_args_augment_on():
    args = input_pipeline.parse_args(["--augment_on=device,gpu"])
    assert "--augment_on" in input_pipeline.check_args(args)
    args = input_pipeline.parse_args(["--augment_on=device", "--breakdown"])
    assert "--breakdown" in input_pipeline.check_args(args)
    args = input_pipeline.parse_args([])
    assert input_pipeline.check_args(args) is None and args.augment_ons == ["host", "device"]


def test_write_tree_matches_the_archive_layout(tmp_path):
    contents = fake_voc.synthetic_contents(3, 2, size=(32, 24))
    root = fake_voc.write_tree(contents, tmp_path)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files == set(contents[fake_voc.VOC_ARCHIVE]) | set(contents[fake_voc.SBD_ARCHIVE])
    mask = PIL.Image.open(root / fake_voc.voc_png("2008_000001"))
    assert mask.mode == "P" and mask.size == (32, 24)
