"""The whole run: main's command line, a short training that checkpoints and resumes."""
import os
import shutil
import subprocess
import sys

import flax
import numpy as np
import pytest

from scaleattn import checkpoint, experiment, loop
from scaleattn import config as config_lib
from scaleattn.pretrained import WeightsError

pytestmark = pytest.mark.slow  # end-to-end: see conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config_of(tiny_demo_config):
    """``config_of(steps)``: the tiny demo run of this module, ``steps`` long."""
    def make(steps):
        c = tiny_demo_config(images=(16, 8), crop=48, fc_width=64, batch=8, steps=steps,
                             log_every=1, checkpoint_every=2)
        c.optim.schedule = "constant"  # so that a 2-step run is the start of a 4-step one
        return c
    return make


def saved_params(workdir, step):
    manager = checkpoint.make_manager(str(workdir), keep=5)
    assert step in manager.all_steps()
    tree, meta = checkpoint.read(manager, step)
    assert meta["step"] == meta["data_position"] == step
    return flax.traverse_util.flatten_dict(tree["state"]["params"], sep="/")


@pytest.fixture(scope="module")
def straight_run(config_of, tmp_path_factory):
    """A 4-step run that checkpoints at steps 2 and 4, then evaluates."""
    workdir = tmp_path_factory.mktemp("straight")
    scores = loop.train_and_evaluate(config_of(4), str(workdir))
    return workdir, scores


def test_train_checkpoints_and_evaluates(straight_run):
    workdir, scores = straight_run
    assert 0.0 <= scores["miou"] <= 1.0 and scores["per_class_iou"].shape == (4,)
    assert sorted(checkpoint.make_manager(str(workdir), 5).all_steps()) == [2, 4]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    pictures = sorted(os.listdir(os.path.join(workdir, "eval_pictures")))  # 3 val images
    assert pictures == [f"eval_{i}{s}.png" for i in range(3) for s in ("", "_input")]


def test_resume_gives_the_same_parameters(straight_run, config_of, tmp_path):
    first_half = config_of(2)
    first_half.train.eval_at_end = False
    loop.train_and_evaluate(first_half, str(tmp_path))
    loop.train_and_evaluate(config_of(4), str(tmp_path))  # resumes at 2
    a, b = saved_params(straight_run[0], 4), saved_params(tmp_path, 4)
    assert a.keys() == b.keys()
    for key in a:  # same batches, same dropout keys, same updates: bit-identical
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_and_eval_do_not_read_init_from(straight_run, config_of, tmp_path):
    """model.init_from is only for a fresh run: resuming (or evaluating) restores the
    whole state from the checkpoint, so a file that is gone since is no error."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    config = config_of(4)
    config.model.init_from = str(tmp_path / "moved_away.msgpack")
    config.train.eval_at_end = False
    loop.train_and_evaluate(config, str(workdir))  # resumes at 4: nothing left to do
    assert experiment.evaluate_checkpoint(config, str(workdir))["miou"] == pytest.approx(
        straight_run[1]["miou"])
    with pytest.raises(WeightsError, match="model.init_from=.*does not exist"):
        loop.train_and_evaluate(config, str(tmp_path / "fresh"))


def test_checkpoint_of_another_model_is_a_clear_error(straight_run, config_of):
    other = config_of(6)
    other.model.fc_width = 32
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"trained with another model \(model.fc_width: saved 64, now 32\)"):
        loop.train_and_evaluate(other, str(straight_run[0]))


def run_main(*args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "scaleattn.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                      "--config.train.stepz=10")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "unknown config key 'stepz'" in result.stderr
    assert 'did you mean "steps"' in result.stderr


def test_wrong_type_and_bad_value_are_one_line_errors(tmp_path):
    result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                      "--config.train.steps=many")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--config.train.steps=many" in result.stderr
    result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                      "--config.model.merge=mean")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.model.merge='mean'" in result.stderr


@pytest.mark.parametrize("spec,backbone", [("configs/voc.py", "vgg16"),
                                           ("configs/voc_r101.py", "resnet101"),
                                           ("configs/gsag.py:x101", "resnext101_32x8d")])
def test_fresh_paper_run_without_imagenet_weights_stops_before_training(tmp_path, spec,
                                                                        backbone):
    """No silent training from random weights: one line naming model.init_from, the file
    expected and the command that writes it; nothing is created in the workdir."""
    weights_dir = tmp_path / "weights"
    result = run_main(f"--config={spec}", f"--workdir={tmp_path / 'w'}",
                      f"--config.model.pretrained_dir={weights_dir}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1, result.stderr
    expected = f"{weights_dir}/{backbone}_imagenet.msgpack"
    assert "config.model.init_from='imagenet'" in line[0] and expected in line[0]
    assert (f"python -m scaleattn.convert --from=torchvision --arch={backbone} " in line[0]
            and line[0].count(expected) == 2)
    assert "--config.model.init_from=scratch" in line[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("spec", config_lib.shipped())
def test_paper_configs_start_from_imagenet_demo_configs_from_scratch(spec):
    config = config_lib.load(os.path.join(REPO, spec))
    name = config.name
    if name.startswith(("voc_", "gsag_")):
        assert config.model.init_from == "imagenet"
        assert config_lib.pretrained_file(config.model).endswith(
            f"{config.model.backbone}_imagenet.msgpack")
    else:
        assert name.startswith("demo") and config.model.init_from == "scratch"
        assert config_lib.pretrained_file(config.model) is None


def test_voc_config_without_data_says_what_is_expected_where(tmp_path):
    result = run_main("--config=configs/voc.py", f"--workdir={tmp_path / 'w'}",
                      f"--config.data.data_dir={tmp_path / 'data'}",
                      "--config.model.init_from=scratch")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "VOCtrainval_11-May-2012.tar" in result.stderr
    assert "python -m scaleattn.data.build" in result.stderr
    assert str(tmp_path / "data") in result.stderr


@pytest.mark.parametrize("spec", config_lib.shipped())
def test_every_shipped_config_loads_through_the_flag_and_validates(spec, monkeypatch):
    """``--config=SPEC`` as the command line reads it: loaded once, locked, valid."""
    from scaleattn import main  # pylint: disable=import-outside-toplevel
    monkeypatch.chdir(REPO)
    config = main.ConfigFileParser("config").parse(spec)
    config_lib.validate(config)
    assert config.is_locked
    assert main.ConfigFileParser.file_config.to_dict() == config.to_dict()


def test_library_info_lines_are_dropped_warnings_kept():
    from scaleattn.main import QuietLibraries  # pylint: disable=import-outside-toplevel
    import logging  # pylint: disable=import-outside-toplevel

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    quiet = QuietLibraries()
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
    assert not quiet.filter(record(orbax, logging.INFO))
    assert quiet.filter(record(orbax, logging.WARNING))
    assert quiet.filter(record("/repo/scaleattn/loop.py", logging.INFO))
