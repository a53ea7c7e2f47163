"""run.json records, the Markdown report, and bit-identical reruns on CPU."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from scaleattn import config as config_lib
from scaleattn import loop, records, report


def record(recipe, miou, seed=0, per_class=None, **changes):
    """A run.json record of the shipped ``recipe`` with ``section.key=value`` changes."""
    config = config_lib.recipe(recipe)
    config.seed = seed
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return {"name": config.name, "commit": "abc123def456", "steps": 6000, "seed": seed,
            "miou": miou, "pixel_accuracy": 0.9, "per_class_iou": per_class,
            "miou_ms_flip": None if miou is None else miou + 0.01,
            "wall_time_s": 5400.0, "device": "NVIDIA H100 80GB HBM3 x1",
            "params_sha256": "f" * 64, "config": json.loads(config.to_json())}


def test_runs_are_matched_only_to_published_numbers_of_their_setting():
    runs = [dict(record("voc", 0.7123), workdir="/x/attn"),
            dict(record("voc:baseline", 0.6301), workdir="/x/b"),
            dict(record("voc:baseline", 0.64, optim__schedule="poly"), workdir="/x/p"),
            dict(record("voc_r101", None), workdir="/x/r"),
            dict(record("demo", 0.5), workdir="/x/demo/")]
    lines = report.markdown_table(runs).splitlines()
    assert lines[0].startswith("| run | config | commit | seed | steps | mIoU | mIoU ms+flip |")
    assert len(lines) == 2 + 5
    # The attention paper's only VOC entry is test + CRF: a val run without CRF has none.
    assert lines[2] == ("| attn | voc_s3 | `abc123def456` | 0 | 6000 | 71.23 | 72.23 | 90.0 min "
                        "| NVIDIA H100 80GB HBM3 x1 | `ffffffffffff` | — | no published "
                        "number for this split / CRF / model setting |")
    assert "| 63.01 | 64.01 |" in lines[3] and "| 62.25 | DeepLab-LargeFOV, step policy" in lines[3]
    assert "| 63.42 | DeepLab-LargeFOV, poly policy (val, CRF no, MS-COCO no;" in lines[4]
    assert lines[5].endswith("| — | no published number for this split / CRF / model setting |")
    assert lines[6].startswith("| demo | demo_attention |")
    # The same runs evaluated with a CRF, and on the test split, find the CRF rows only.
    crf = dict(record("voc:baseline", 0.68), crf={"applied": True})
    assert report.paper_reference(crf)["miou"] == 67.64
    test_crf = dict(record("voc", 0.75, data__eval_split="test"), crf={"applied": True})
    assert report.paper_reference(test_crf)["miou"] == 75.7
    assert report.paper_reference(dict(record("voc", 0.75, data__eval_split="test"))) is None


def test_published_numbers_are_labelled_with_split_crf_and_coco():
    table = report.paper_table()
    assert "| DeepLab-CRF-Attention (the Attention-to-Scale entry) | test | yes | not established" \
        " | 75.70 |" in table
    assert "| DeepLab-CRF-Attention-DT" in table and "| 76.30 |" in table
    for row in report.PAPER:
        assert row["split"] in ("val", "test") and row["crf"] in (True, False, None)
    assert not any(row["miou"] == 77.0 for row in report.PAPER)  # no unsourced "~77 val"


def test_runs_that_differ_only_in_seed_become_one_row_with_mean_and_std():
    runs = [record("demo", m, seed=s, per_class=[0.9, p, None])
            for s, (m, p) in enumerate([(0.5, 0.2), (0.6, 0.4), (0.7, 0.6)])]
    # How a run computes (the lowering, folded batch norm) does not split a group.
    runs[1] = record("demo", 0.6, seed=1, per_class=[0.9, 0.4, None],
                     model__dilated_conv="taps", model__fold_frozen_bn=False)
    runs.append(record("demo:avg", 0.4, seed=0))
    del runs[2]["config"]["crf"]        # a run from before the schema had crf.*: same group
    runs.append(record("demo", 0.9, seed=3, optim__base_lr=0.5))  # another setting
    lines = report.seed_table(runs).splitlines()
    assert len(lines) == 2 + 3
    # mean 0.6, sample std 0.1 (in %): 60.00 ± 10.00; rows of one name are told apart
    # by the keys whose values differ between them
    assert lines[2].startswith("| demo_attention (optim.base_lr=0.01) | 0, 1, 2 | 6000 | "
                               "60.00 ± 10.00 | 90.00 ± 0.00 / 40.00 ± 20.00 / — | "
                               "61.00 ± 10.00 |")
    assert lines[3].startswith("| demo_avg | 0 | 6000 | 40.00 | — | 41.00 |")
    assert lines[4].startswith("| demo_attention (optim.base_lr=0.5) | 3 | 6000 | 90.00 |")


def test_seed_groups_that_mix_library_versions_are_named_below_the_table():
    versions = {"python": "3.11.7", "jax": "0.10.2", "numpy": "2.4.6"}
    same = [dict(record("demo", 0.5, seed=s), versions=versions) for s in (0, 1)]
    assert report.seed_table(same).count("\n") == 3  # header, rule, one row: no note
    mixed = same + [dict(record("demo", 0.6, seed=2), versions=dict(versions, jax="0.10.3")),
                    record("demo:avg", 0.4, seed=0), record("demo:avg", 0.4, seed=1)]
    lines = report.seed_table(mixed).splitlines()
    assert len(lines) == 2 + 2 + 2  # the two groups stay groups; one note
    assert lines[2].startswith("| demo_attention | 0, 1, 2 |")
    assert lines[-1] == ("- demo_attention: its runs used different library versions "
                         "(jax 0.10.2, 0.10.2, 0.10.3), which can move the scores")
    older = [same[0], record("demo", 0.6, seed=1)]  # written before versions were recorded
    assert "(jax 0.10.2, unknown; numpy 2.4.6, unknown; python 3.11.7, unknown)" in \
        report.seed_table(older)


def test_run_record_names_the_installed_library_versions():
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    import platform  # pylint: disable=import-outside-toplevel
    versions = records.package_versions()
    assert versions["python"] == platform.python_version()
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-datasets"):
        assert versions[name] == importlib.metadata.version(name), name
    assert set(versions) <= {"python", *records.RECORDED_PACKAGES}


def test_report_command_reads_workdirs(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 1)):
        records.write_run(str(tmp_path / name), record("demo", 0.25 + seed / 10, seed=seed))
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"),
                        f"--output={tmp_path / 'table.md'}"]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "table.md").read_text()
    assert "| a | demo_attention |" in printed and "| b | demo_attention |" in printed
    assert "| demo_attention | 0, 1 | 6000 | 30.00 ± 7.07 |" in printed
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "missing/run.json does not exist" in capsys.readouterr().err
    assert report.main(["--paper"]) == 0
    assert "| 62.25 |" in capsys.readouterr().out


def test_report_json_renders_the_demo_table(tmp_path):
    """--json writes the seed groups as data; benchmarks.demo_tables renders the docs
    table from that file alone (mean ± sample std over seeds, in %)."""
    from benchmarks import demo_tables  # pylint: disable=import-outside-toplevel
    runs = {"att_s0": record("demo", 0.80, seed=0, per_class=[0.98, 0.8, 0.7, 0.72]),
            "att_s1": record("demo", 0.90, seed=1, per_class=[0.98, 0.9, 0.9, 0.82]),
            "one_s0": record("demo:single", 0.5, seed=0, per_class=[0.9, 0.3, 0.4, 0.4])}
    for name, run in runs.items():
        records.write_run(str(tmp_path / name), run)
    out = tmp_path / "demo.json"
    assert report.main([str(tmp_path / n) for n in runs] + [f"--json={out}"]) == 0
    summary = json.loads(out.read_text())
    assert [g["name"] for g in summary["groups"]] == ["demo_attention", "demo_single"]
    assert [r["seed"] for r in summary["groups"][0]["runs"]] == [0, 1]
    assert summary["groups"][0]["runs"][1]["workdir"] == "att_s1"
    lines = demo_tables.render(summary).splitlines()
    assert len(lines) == 2 + 2
    # rows in the table's order (single scale first, as in demo_tables.TABLES)
    assert lines[3] == ("| `demo_attention` | {1, 0.5} | attention | yes | 0, 1 | "
                        "**85.0 ± 7.1** | "
                        "98.0 ± 0.0 | 85.0 ± 7.1 | 80.0 ± 14.1 | 77.0 ± 7.1 | 80.0 / 90.0 |")
    assert lines[2] == ("| `demo_single` | {1} | — | — | 0 | **50.0** | 90.0 | 30.0 | 40.0 | "
                        "40.0 | 50.0 |")
    # the command line: the table, and the results file with the commands given
    result = tmp_path / "result.json"
    assert demo_tables.main(["render", str(out), f"--result={result}", "--command=a b",
                             "--command=c", "--machine=m"]) == 0
    written = json.loads(result.read_text())
    assert written["command"] == ["a b", "c"] and written["machine"] == "m"
    assert written["rows"][1][0] == "`demo_attention`"


def test_tree_digest_sees_every_bit():
    tree = {"a": jnp.arange(4.0), "b": {"c": np.ones((2, 2), np.int32)}}
    same = {"a": jnp.arange(4.0), "b": {"c": np.ones((2, 2), np.int32)}}
    assert records.tree_digest(tree) == records.tree_digest(same)
    flipped = np.arange(4.0, dtype=np.float32)
    flipped.view(np.uint32)[2] ^= 1  # the last bit of one value
    assert records.tree_digest({"a": flipped, "b": same["b"]}) != records.tree_digest(tree)


@pytest.fixture
def report_config(tiny_demo_config, tmp_path):
    c = tiny_demo_config(images=(8, 4), crop=32, fc_width=32, batch=4, steps=3, log_every=3,
                         checkpoint_every=3, data_dir=tmp_path / "data")
    c.predict.summary_images = 1
    return c


def test_same_seed_and_config_give_bit_identical_runs(tmp_path, report_config):
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path / name
        scores = loop.train_and_evaluate(report_config, str(workdir))
        runs.append(json.loads((workdir / "run.json").read_text()))
        assert runs[-1]["miou"] == scores["miou"]
    first, second = runs
    assert first["steps"] == 3 and first["name"] == "demo_attention"
    assert first["start"] == "scratch" and len(first["per_class_iou"]) == 4
    assert first["wall_time_s"] > 0 and first["device"].startswith("cpu")
    assert first["versions"] == records.package_versions()
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


def test_hierarchical_table_reads_the_merges_runs_and_the_other_scale_lists(tmp_path):
    """`demo_tables.hier_table`: the trained-scale rows come from each run's run.json,
    the other scale lists from the ``--mode=eval --output`` files (present here, so no
    eval runs); mean ± sample std and the per-seed values, checked by hand."""
    from benchmarks import demo_tables  # pylint: disable=import-outside-toplevel
    mious = {"attention": (0.70, 0.74), "hier": (0.60, 0.64)}
    for stem, values in mious.items():
        for seed, miou in enumerate(values):
            workdir = tmp_path / "merges" / f"{stem}_s{seed}"
            workdir.mkdir(parents=True)
            (workdir / "run.json").write_text(json.dumps({"miou": miou}))
    (tmp_path / "hier_eval").mkdir()
    for scales, values in (("0.25,0.5,1.0", (0.50, 0.56)), ("0.5,1.0,2.0", (0.40, 0.40))):
        for seed, miou in enumerate(values):
            (tmp_path / "hier_eval" / f"hier_s{seed}_{scales}.json").write_text(
                json.dumps({"miou": miou}))
    columns, rows, commands = demo_tables.hier_table(str(tmp_path), [0, 1], [])
    assert columns[-1] == "val mIoU (per seed 0 / 1)"
    # mean 72, sample std of (70, 74) = 2.83
    assert rows[0][-1] == "72.0 ± 2.8 (70.0 / 74.0)"
    assert rows[1][-1] == "62.0 ± 2.8 (60.0 / 64.0)"
    assert rows[2][-1] == "53.0 ± 4.2 (50.0 / 56.0)"
    assert rows[3][-1] == "40.0 ± 0.0 (40.0 / 40.0)"
    assert [r[2] for r in rows] == ["{1, 0.5}", "{0.5, 1}", "{0.25, 0.5, 1}", "{0.5, 1, 2}"]
    assert len(commands) == 2 and all("--mode=eval" in c for c in commands)


def test_crf_table_reads_the_search_and_the_evaluations(tmp_path):
    """`demo_tables.crf_table`: the no-CRF row from each attention run's run.json, the
    CRF rows from the ``--mode=eval --output`` files, the searched row named and run
    with the search's best setting (files present here, so nothing runs); mean ± std,
    per seed and the per-class mean checked by hand."""
    from benchmarks import demo_tables  # pylint: disable=import-outside-toplevel
    (tmp_path / "crf").mkdir()
    files = {"none": "merges/attention_s{}/run.json", "deeplab": "crf/deeplab_s{}.json",
             "searched": "crf/searched_s{}.json"}
    mious = {"none": (0.70, 0.74), "deeplab": (0.72, 0.72), "searched": (0.75, 0.79)}
    for stem, pattern in files.items():
        for seed, miou in enumerate(mious[stem]):
            path = tmp_path / pattern.format(seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"miou": miou,
                                        "per_class_iou": [0.9, miou, 0.5 + seed / 10, 0.0]}))
    (tmp_path / "crf" / "search_s0.json").write_text(json.dumps({
        "images": 100, "flags": "--config.crf.bilateral_weight=8 "
                                "--config.crf.bilateral_xy_std=20 --config.crf.bilateral_rgb_std=20",
        "best": {"bilateral_weight": 8.0, "bilateral_xy_std": 20.0, "bilateral_rgb_std": 20.0}}))
    columns, rows, commands = demo_tables.crf_table(str(tmp_path), [0, 1], [])
    assert columns[1] == "val mIoU (per seed 0 / 1)"
    assert [r[1] for r in rows] == ["72.0 ± 2.8 (70.0 / 74.0)", "72.0 ± 0.0 (72.0 / 72.0)",
                                    "77.0 ± 2.8 (75.0 / 79.0)"]
    assert rows[2][0] == "CRF, searched on seed 0's first 100 val images (w1 8, θα 20, θβ 20)"
    # per class: mean over seeds of (0.9, miou, 0.5 / 0.6, 0)
    assert rows[0][2] == "90.0 / 72.0 / 55.0 / 0.0"
    assert "--mode=crf_search" in commands[0]
    assert "'--config.crf.search_bilateral_weights=(3.0,5.0,8.0)'" in commands[0]  # quoted
    assert "--config.eval.crf=True" in commands[1]
    assert "--config.crf.bilateral_weight=8" in commands[2]
