"""Fault classes that must never go silently wrong, checked without a training run:
config values out of their range (every numeric and tuple key), outputs over inputs
(every tool's check), states and checkpoints with NaN/Inf arrays, resume positions, a
run given twice to the report, the dataset build lock, the launchers' arguments, and
dataset faults (labels outside the classes, unknown splits, sizes, damaged records).
The end-to-end versions (real runs, real CLIs) are in test_reliability.py.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from scaleattn import checkpoint, config as config_lib, convert, finite, loop, outputs, report
from scaleattn.checksums import CHECKSUM_FORMAT, tree_checksums
from scaleattn.data import buildlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------ config ranges ---

Range, Items = config_lib.Range, config_lib.Items


@pytest.mark.parametrize("rule, value, holds", [
    (Range(0, open_low=True), 1e-9, True), (Range(0, open_low=True), 0.0, False),
    (Range(0, open_low=True), -1.0, False), (Range(0, open_low=True), math.inf, False),
    (Range(0, open_low=True), math.nan, False), (Range(0, 1, open_high=True), 1.0, False),
    (Range(0, 1, open_high=True), 0.0, True), (Range(0, 1), 1.0, True),
    (Range(1, special=((0, "all"),)), 0, True), (Range(1, special=((0, "all"),)), -1, False),
    (Range(1), True, False),  # a bool is not a count
    (Items(Range(0, 4, open_low=True), distinct=True), (1.0, 0.5), True),
    (Items(Range(0, 4, open_low=True), distinct=True), (1.0, 1.0), False),
    (Items(Range(0, 4, open_low=True), distinct=True), (), False),
    (Items(Range(0, 4, open_low=True), length=(0, None)), (), True),
    (Items(Range(0, 255), length=3), (1.0, 2.0), False),
    (Items(Range(0, 255), length=3), (1.0, 2.0, math.nan), False),
    (Items(Range(0, 4), length=2, ascending=True), (2.0, 1.0), False),
])
def test_a_rule_holds_exactly_for_the_values_it_describes(rule, value, holds):
    assert rule.holds(value) is holds


def numeric_keys(config) -> list[str]:
    """Keys whose value is a number or a tuple of numbers (strings and bools aside)."""
    keys = []
    for key, value in config_lib.flatten(config).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or (isinstance(value, tuple) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            keys.append(key)
    return keys


def test_every_numeric_and_tuple_key_has_a_declared_range():
    base = config_lib.base_config()
    assert sorted(set(numeric_keys(base)) - set(config_lib.RANGES)) == []
    flat = config_lib.flatten(base)
    assert sorted(set(config_lib.RANGES) - set(flat)) == []  # no rule for a missing key


# (key, bad value, a fragment of the message): values the fault pass found accepted, and
# their neighbours.
BAD_VALUES = [
    ("optim.base_lr", -0.01, "must be > 0"),
    ("optim.base_lr", math.nan, "must be > 0"),
    ("optim.step_size", 0, "must be >= 1"),
    ("optim.momentum", 5.0, "must be in [0, 1)"),
    ("optim.weight_decay", -1e-4, "must be >= 0"),
    ("model.width", 0.0, "must be in (0, 4]"),
    ("model.scales", (1.0, 1.0), "distinct values"),
    ("model.scales", (1.0, 100.0), "each in (0, 4]"),
    ("model.scales", (1.0, 0.001), "less than one output pixel"),
    ("model.depth", (1, 1, 1), "has 3 entries"),
    ("loss.ohem_threshold", -1.0, "must be in (0, 1]"),
    ("loss.ohem_min_kept", -5, "must be >= 0"),
    ("eval.max_batches", -1, "or 0 (the whole split)"),
    ("data.std", (0.0, 0.0, 0.0), "each in (0, 255]"),
    ("data.mean", (127.5, 127.5), "a tuple of 3 values"),
    ("data.scale_range", (0.5,), "a tuple of 2 values"),
    ("data.shuffle_buffer", -1, "must be >= 1"),
    ("predict.ms_scales", (0.0, 1.0), "each in (0, 4]"),
    ("predict.ms_scales", (-0.5, 1.0), "each in (0, 4]"),
    ("bench.steps", 0, "must be >= 1"),
    ("train.keep_checkpoints", 0, "must be >= 1"),
]


@pytest.mark.parametrize("key, value, fragment", BAD_VALUES,
                         ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_a_value_out_of_its_range_is_refused_naming_key_value_and_range(key, value, fragment):
    config = config_lib.recipe("demo")
    section, name = key.rsplit(".", 1)
    config_lib.lookup(config, section)[name] = value
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    assert f"config.{key}=" in message and fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("flag, value", [("--mean", "nan,1,1"), ("--std", "0,0,0"),
                                         ("--mean", "1,2"), ("--std", "1,1,-3")])
def test_convert_checks_mean_and_std_with_the_config_ranges(flag, value, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        convert.main(["--from=torchvision", "--arch=vgg16", f"{flag}={value}",
                      str(tmp_path / "src.pth"), str(tmp_path / "dst.msgpack")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "config.data." in err
    assert not os.listdir(tmp_path)

# --------------------------------------------------------------- outputs over inputs ---


@pytest.fixture
def places(tmp_path):
    """A workdir with its records and checkpoints, an input folder and a config file."""
    work = tmp_path / "run"
    (work / "checkpoints" / "4").mkdir(parents=True)
    (work / "run.json").write_text("{}")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
    os.symlink(images / "a.png", tmp_path / "link.png")
    return tmp_path


REFUSED = [  # (output, folder output?, what the message says)
    ("images/a.png", False, "is also an input"),
    ("link.png", False, "is also an input"),             # the same file under a link
    ("images", True, "is also an input"),                # predict --output=--input
    (".", True, "holds the input"),
    ("run/run.json", False, "the run's own run.json"),
    ("run/train.lock", False, "the run's own train.lock"),
    ("run/checkpoints", True, "which the training run owns"),
    ("run/checkpoints/4/x.json", False, "which the training run owns"),
]


@pytest.mark.parametrize("output, folder, fragment", REFUSED)
def test_an_output_over_an_input_or_a_runs_records_is_refused(places, output, folder,
                                                              fragment):
    with pytest.raises(outputs.OutputError, match=fragment):
        outputs.check_not_over(str(places / output), "--output", folder=folder,
                               inputs=[str(places / "images"), str(places / "images/a.png")],
                               workdirs=[str(places / "run")])


@pytest.mark.parametrize("output, folder", [("run/predict", True), ("run/crf.json", False),
                                            ("out", True), ("images/b.png", False)])
def test_outputs_beside_inputs_and_records_are_allowed(places, output, folder):
    path = str(places / output)
    assert outputs.check_not_over(path, "--output", folder=folder,
                                  inputs=[str(places / "images/a.png")],
                                  workdirs=[str(places / "run")]) == path


def test_convert_refuses_to_write_over_its_source(tmp_path, capsys):
    source = tmp_path / "weights.pth"
    source.write_bytes(b"not really weights")
    assert convert.main(["--from=torchvision", "--arch=vgg16", str(source), str(source)]) == 1
    assert "is also an input" in capsys.readouterr().err
    assert source.read_bytes() == b"not really weights"


def write_record(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": "demo_attention", "steps": 4, "miou": 0.5, "seed": 0,
              "params_sha256": "a" * 64, "date": "2026-01-01T00:00:00+00:00",
              "config": {"seed": 0, "optim": {"base_lr": 0.01}}}
    record.update(fields)
    (folder / "run.json").write_text(json.dumps(record))
    return str(folder)


def test_report_refuses_a_run_twice_and_its_own_input_as_output(tmp_path, capsys):
    run = write_record(tmp_path / "a")
    shutil.copytree(run, tmp_path / "copy")
    before = (tmp_path / "a" / "run.json").read_text()
    for argv, fragment in (([run, run + "/"], "the same folder"),
                           ([run, str(tmp_path / "copy")], "the same record"),
                           ([run, f"--output={run}/run.json"], "is also an input")):
        assert report.main(argv) == 1
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
    assert (tmp_path / "a" / "run.json").read_text() == before
    other = write_record(tmp_path / "b", seed=1, params_sha256="b" * 64,
                         config={"seed": 1, "optim": {"base_lr": 0.02}})
    assert report.main([run, other]) == 0
    table = capsys.readouterr().out
    assert "| demo_attention (optim.base_lr=0.01) | 0 |" in table
    assert "| demo_attention (optim.base_lr=0.02) | 1 |" in table

# ----------------------------------------------------------------- finite states ---


def tiny_state(bad_at=None, value=np.nan):
    state = {"params": {"conv": {"kernel": np.ones((3, 3), np.float32),
                                 "bias": np.zeros((3,), jax.numpy.bfloat16)}},
             "batch_stats": {"bn": {"mean": np.zeros((3,), np.float32)}},
             "opt_state": {"trace": {"kernel": np.zeros((3, 3), np.float32)},
                           "count": np.array(5, np.int32)}}
    if bad_at:
        *path, leaf = bad_at.split("/")
        node = state
        for part in path:
            node = node[part]
        node[leaf] = node[leaf].copy()
        node[leaf].reshape(-1)[0] = value
    return state


BAD_ARRAYS = ["params/conv/kernel", "params/conv/bias", "batch_stats/bn/mean",
              "opt_state/trace/kernel"]


@pytest.mark.parametrize("where", BAD_ARRAYS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_named(where, value):
    assert finite.nonfinite_arrays(tiny_state()) == []
    assert finite.nonfinite_arrays(tiny_state(where, value)) == [where]


def meta_config():
    return config_lib.recipe("demo")


def save_unchecked(manager, step, state, config):
    """A save as a version without the finiteness check wrote it (meta and checksums
    as `checkpoint.save` writes them)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    tree = {"state": state, "rng": np.zeros((4,), np.uint32)}
    text = config.to_json()
    meta = {"step": step, "data_position": step, "config": text,
            "config_sha256": checkpoint.config_digest(text), "checksum_format": CHECKSUM_FORMAT,
            "checksums": tree_checksums(tree)}
    manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


@pytest.mark.parametrize("where", BAD_ARRAYS)
def test_a_non_finite_state_is_never_saved(tmp_path, where):
    manager = checkpoint.make_manager(str(tmp_path), 3, training=True, async_save=False)
    checkpoint.save(manager, 1, tiny_state(), np.zeros((4,), np.uint32), meta_config())
    with pytest.raises(checkpoint.NonFiniteState, match=f"step 2 holds NaN/Inf values in "
                                                        f"{where.replace('/', '.?/')}"):
        checkpoint.save(manager, 2, tiny_state(where), np.zeros((4,), np.uint32), meta_config())
    manager.wait_until_finished()
    assert checkpoint.complete_steps(manager.directory) == [1]
    assert sorted(os.listdir(manager.directory)) == ["1"]


@pytest.mark.parametrize("reader", ["eval", "fallback", "training"])
def test_a_non_finite_checkpoint_is_refused_or_skipped(tmp_path, reader):
    config = meta_config()
    manager = checkpoint.make_manager(str(tmp_path), 3, training=True, async_save=False)
    checkpoint.save(manager, 1, tiny_state(), np.zeros((4,), np.uint32), config)
    save_unchecked(manager, 2, tiny_state("params/conv/kernel"), config)
    template, rng = tiny_state(), np.zeros((4,), np.uint32)
    if reader == "eval":
        with pytest.raises(checkpoint.NonFiniteCheckpoint,
                           match=r"checkpoints/2 holds NaN/Inf values: its arrays "
                                 r"params/conv/kernel hold .*--checkpoint_fallback"):
            checkpoint.restore_for_reading(checkpoint.open_for_reading(str(tmp_path)),
                                           template, rng, config=config)
        return
    if reader == "fallback":
        _, _, meta = checkpoint.restore_for_reading(checkpoint.open_for_reading(str(tmp_path)),
                                                    template, rng, config=config, fallback=True)
        assert meta["step"] == 1 and checkpoint.complete_steps(manager.directory) == [1, 2]
        return
    _, _, meta = checkpoint.restore_latest(manager, template, rng, config=config, writable=True)
    assert meta["step"] == 1
    assert checkpoint.complete_steps(manager.directory) == [1]  # set aside, not deleted
    assert len(os.listdir(tmp_path / checkpoint.UNREADABLE_DIR)) == 1

# ------------------------------------------------------------------------ resume ---


def test_a_step_folder_whose_saved_step_differs_is_refused(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), 3, training=True, async_save=False)
    checkpoint.save(manager, 4, tiny_state(), np.zeros((4,), np.uint32), meta_config())
    os.rename(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / "6")
    with pytest.raises(checkpoint.StepMismatch, match=r"checkpoints/6 holds the state of "
                                                      r"step 4, not of step 6"):
        checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path), 3, training=True),
                                  tiny_state(), np.zeros((4,), np.uint32), writable=True)


def resume_config(steps=10, batch=8):
    config = meta_config()
    config.train.steps, config.batch_size = steps, batch
    return config


@pytest.mark.parametrize("meta, config, expected", [
    ({"step": 4, "batch_size": 8, "data_position_images": 32}, resume_config(), 32),
    ({"step": 4, "batch_size": 8, "data_position_images": 32}, resume_config(batch=4), 32),
    ({"step": 4}, resume_config(batch=4), 16),   # an older checkpoint: batches, as saved
    ({"step": 4, "batch_size": 8}, resume_config(batch=4),
     "differs from the checkpoint's \\(8\\)"),
    ({"step": 4, "batch_size": 8, "data_position_images": 32}, resume_config(steps=2),
     "train.steps=2 is below the step of the checkpoint"),
])
def test_resume_continues_at_the_same_image_or_says_why_not(meta, config, expected):
    if isinstance(expected, str):
        with pytest.raises(config_lib.ConfigError, match=expected):
            loop.resume_position(config, meta, "/w")
    else:
        assert loop.resume_position(config, meta, "/w") == expected

# -------------------------------------------------------------- machine and tools ---


def test_the_dataset_build_lock_makes_a_second_builder_wait(tmp_path):
    order = []

    def second():
        with buildlock.held(str(tmp_path), "scale_shapes"):
            order.append("second")

    with buildlock.held(str(tmp_path), "scale_shapes"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(10)
    assert order == ["first done", "second"]


def test_running_out_of_device_memory_is_one_line():
    from scaleattn import main as scaleattn_main  # pylint: disable=import-outside-toplevel
    error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                       "allocate 81604378624 bytes.\nBufferAssignment ...")
    line = scaleattn_main.environment_error(error)
    assert line.startswith("the device ran out of memory (RESOURCE_EXHAUSTED") and "\n" not in line
    assert scaleattn_main.environment_error(ValueError("other")) is None


LAUNCH_FAULTS = [  # a launcher's arguments that cannot work: refused before any plan
    ("slurm_gpu.py", ["--workdir=/tmp/x", "--nodes=0"], "--nodes: 0 is out of range"),
    ("slurm_gpu.py", ["--workdir=/tmp/x", "--gpus-per-node=-1"], "must be >= 1"),
    ("slurm_gpu.py", ["--workdir=/tmp/x", "--config=configs/missing.py"], "no such file"),
    ("slurm_gpu.py", ["--workdir=/tmp/x", "--config=configs/demo.py", "--",
                      "--config.model.width=0.0"], "config.model.width=0.0 is out of range"),
    ("tpu_vm.py", ["all", "--name=n", "--project=p", "--zone=z", "--workdir=gs://b/r",
                   "--max-restarts=-1"], "--max-restarts: -1 is out of range"),
    ("tpu_vm.py", ["train", "--name=n", "--project=p", "--zone=z", "--workdir=gs://b/r",
                   "--config=configs/missing.py"], "no such file"),
    ("tpu_vm.py", ["train", "--name=n", "--project=p", "--zone=z", "--workdir=gs://b/r",
                   "--config=configs/demo.py", "--", "--config.optim.base_lr=-1.0"],
     "config.optim.base_lr=-1.0 is out of range"),
]


@pytest.mark.parametrize("script, args, fragment", LAUNCH_FAULTS)
def test_launchers_check_their_numbers_and_the_config_before_a_plan(script, args, fragment):
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args,
                             "--dry-run"], capture_output=True, text=True, timeout=120,
                            cwd=REPO, check=False)
    assert result.returncode != 0 and result.stdout == "", result.stdout
    assert fragment in result.stderr.splitlines()[-1], result.stderr

# ------------------------------------------------------------------------ the data ---


@pytest.fixture(scope="module")
def demo_data(tiny_demo_config):
    """The tiny demo config and its (built) dataset."""
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    config = tiny_demo_config(images=(16, 8), crop=48, fc_width=64, batch=8, steps=4,
                              log_every=1, checkpoint_every=2)
    pipeline.ensure_prepared(config.data)
    return config


@pytest.mark.parametrize("which", ["train", "eval"])
def test_a_label_outside_the_classes_names_the_image_and_the_label(demo_data, which):
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    kwargs = dict(batch_size=4, ignore_label=255, num_classes=2)  # the demo has 4 classes
    batches = (pipeline.train_batches(demo_data.data, seed=0, **kwargs) if which == "train"
               else pipeline.eval_batches(demo_data.data, **kwargs))
    with pytest.raises(pipeline.LabelError,
                       match=r"^image (train|val)_\d+ of the dataset in \S+ has label [23], "
                             r"neither a class 0..1 \(model.num_classes=2\) nor the ignore "
                             r"label 255: fix"):
        next(batches)


@pytest.mark.parametrize("change, fragment", [
    (dict(eval_split="test"), "config.data.eval_split='test': dataset scale_shapes"),
    (dict(train_split="train_aug"), "config.data.train_split='train_aug'"),
    (dict(eval_size=64), "data.eval_size=64 is smaller than image"),
    (dict(augment_on="device", canvas_size=64), "data.canvas_size=64 is smaller than image"),
])
def test_what_would_fail_after_training_is_checked_before_it(demo_data, change, fragment):
    from scaleattn import experiment  # pylint: disable=import-outside-toplevel
    from scaleattn.data import errors  # pylint: disable=import-outside-toplevel
    config = config_lib.recipe("demo")
    config.data = demo_data.data.copy_and_resolve_references()
    config.data.update(change)
    with pytest.raises((config_lib.ConfigError, errors.DataError), match=fragment):
        experiment.check_data_fits(config)
    experiment.check_data_fits(demo_data)  # the unchanged config passes


def test_damaged_dataset_records_name_the_folder_and_how_to_rebuild(demo_data, tmp_path):
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    data = demo_data.data.copy_and_resolve_references()
    shutil.copytree(data.data_dir, tmp_path / "data")
    data.data_dir = str(tmp_path / "data")
    # The session's data folder may hold several builds: damage every train shard, in its
    # first record's payload (after the 12-byte length header), which any read reaches.
    records = sorted((tmp_path / "data").rglob("*train.tfrecord*"))
    assert records
    for record in records:
        blob = bytearray(record.read_bytes())
        for i in range(12, 44):
            blob[i] ^= 0xFF
        record.write_bytes(bytes(blob))
    with pytest.raises(pipeline.DamagedDatasetError,
                       match=r"the dataset files in \S+ are damaged .*delete that folder and "
                             r"build it again"):
        for _ in range(4):
            next(pipeline.train_batches(data, batch_size=8, seed=0, ignore_label=255))


def test_a_changed_batch_size_reads_on_from_the_same_image(demo_data):
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    big = next(pipeline.train_batches(demo_data.data, batch_size=8, seed=0, ignore_label=255,
                                      start_step=1))
    small = pipeline.train_batches(demo_data.data, batch_size=4, seed=0, ignore_label=255,
                                   start_example=8)
    halves = [next(small), next(small)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(big[key], np.concatenate([h[key] for h in halves]))
