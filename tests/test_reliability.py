"""Faults injected for real: damaged checkpoint files (same-size byte damage, truncation,
a missing array folder, a half-written step), two training processes on one workdir,
stale locks, real SIGINT/SIGTERM, a checkpoint of another model definition, real image
files of every PIL mode and oversized ones, and the bad inputs of every tool. Each must
give one line naming the thing and the fix, a non-zero exit, nothing half-written, and
leave read-only workdirs untouched.

One tiny run (`trained`) is trained once in this process; its workdir is copied for
every test that damages it.
"""
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from scaleattn import (checkpoint, checksums, experiment, inference, loop, outputs, predict,
                       preemption, report, runlock)
from scaleout_common import REPO, demo_config_flags, main_command, subprocess_env

pytestmark = pytest.mark.slow  # end-to-end: see conftest.py

# --------------------------------------------------------------------- helpers ---


@pytest.fixture(scope="module")
def tiny_config(tiny_demo_config):
    """``tiny_config(steps=4)``: the tiny demo run of this module."""
    def make(steps=4):
        c = tiny_demo_config(images=(16, 8), crop=48, fc_width=64, batch=8, steps=steps,
                             log_every=1, checkpoint_every=2)
        c.train.eval_at_end = False
        c.predict.summary_images = 0
        return c
    return make


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    """``(config, workdir)`` of a 4-step run with checkpoints at steps 2 and 4."""
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("trained")
    loop.train_and_evaluate(config, str(workdir))
    assert checkpoint.make_manager(str(workdir), 5).all_steps() == [2, 4]
    return config, workdir


def copy_run(trained, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(trained[1], target)
    return target


def tree_hashes(folder) -> dict:
    """``{relative path: sha256}`` of every file (and every folder, as '<dir>')."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "<dir>"
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def data_files(workdir, step) -> list:
    """The array data files of a step, largest first."""
    root = workdir / "checkpoints" / str(step) / "tree"
    files = [p for p in root.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def damage_same_size(workdir, step):
    """Flips 64 bytes in the middle of the step's largest data file; the size stays."""
    path = data_files(workdir, step)[0]
    blob = bytearray(path.read_bytes())
    size = len(blob)
    for i in range(size // 2, size // 2 + 64):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert path.stat().st_size == size


def truncate(workdir, step):
    for path in data_files(workdir, step):
        path.write_bytes(b"")


def cli(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env or subprocess_env(1))


def run_all(commands: dict, timeout=240) -> dict:
    """Runs ``{name: argv}`` side by side; ``{name: CompletedProcess}``."""
    children = {name: subprocess.Popen(argv, cwd=REPO, env=subprocess_env(1), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for name, argv in commands.items()}
    results = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=timeout)
        results[name] = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    return results


NOISE = ("Traceback", "Event loop is closed", "<bound method", "NoneType", "TensorStore(")


def one_line_error(result, *fragments, code=1) -> str:
    """The single ``error:`` line of a failed command (asserted: exit ``code``, no
    traceback or library internals, printed once)."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err[-3000:])
    for noise in NOISE:
        assert noise not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert err.count(lines[0][len("error:"):].strip()[:60]) == 1, err  # said once
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_only_dir(tmp_path) -> str:
    """An existing folder nobody may create files in (for root: a read-only mount)."""
    if os.geteuid() == 0:
        return "/sys"
    folder = tmp_path / "read_only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o500)
    return str(folder)


# ------------------------------------------------------------------- checksums ---


def reference_checksum(array: np.ndarray) -> str:
    """`checksums._sums` written out with Python integers, element by element."""
    flat = np.ascontiguousarray(array).reshape(-1)
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[flat.dtype.itemsize]
    mask = 0xFFFFFFFF
    first = second = 0
    for i, w in enumerate(int(v) for v in flat.view(word)):
        h = (i * 0x9E3779B1 + 0x7F4A7C15) & mask
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & mask
        h ^= h >> 13
        first = (first + w * (h | 1)) & mask
        second = (second + ((w ^ h) * 0xC2B2AE35)) & mask
    return f"{flat.dtype.name}{list(array.shape)}:{first:08x}{second:08x}"


def test_checksum_matches_a_python_reference_and_sees_every_change():
    rng = np.random.default_rng(0)
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    tree = {"f": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
            "i": np.arange(-3, 4, dtype=np.int64), "t": np.array([True, False, True]),
            "s": np.array(7, np.int32)}
    sums = checksums.tree_checksums(tree)
    assert sums == {k: reference_checksum(v) for k, v in tree.items()}
    flipped = tree["f"].copy()
    flipped.view(np.uint32)[1, 2] ^= 1 << 7  # one bit
    swapped = tree["f"].copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # two values trade places
    for changed in (flipped, swapped):
        assert checksums.tree_checksums({"f": changed})["f"] != sums["f"]


def test_checksum_of_sharded_device_arrays_equals_the_host_one():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    host = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    device = jax.device_put(host, sharding)
    (on_device,) = checksums._device_checksums([device])  # pylint: disable=protected-access
    expected = reference_checksum(host).split(":")[1]
    assert f"{int(on_device[0]):08x}{int(on_device[1]):08x}" == expected
    assert checksums.tree_checksums({"x": device})["x"] == reference_checksum(host)


# ---------------------------------------------------------- damaged checkpoints ---


def restore_template(config):
    run = experiment.setup_run(config)
    rng = jax.random.PRNGKey(config.seed)
    return jax.eval_shape(lambda: experiment.initial_state(run, rng, pretrained_start=False)), rng


def test_damaged_steps_stop_eval_with_one_quiet_line_and_change_nothing(trained, tmp_path):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    damage_same_size(workdir, 4)
    truncate(workdir, 2)  # reading it fails inside TensorStore, on many threads
    before = tree_hashes(workdir)
    result = cli(*main_command(config, workdir, "--mode=eval", "--checkpoint_fallback")[2:])
    line = one_line_error(result, "no checkpoint in", "is good", f"{workdir}/checkpoints/4: "
                          "array ", "does not match the checksum saved with it",
                          f"{workdir}/checkpoints/2: its array")
    print(line)
    assert tree_hashes(workdir) == before


def test_eval_output_is_the_runs_own_final_score(trained, tmp_path):
    """``--mode=eval --output=FILE`` writes the scores of the latest checkpoint as JSON:
    the mIoU and per-class IoU of that checkpoint's confusion matrix (recomputed here in
    NumPy from the eval step's own matrix), the step and the scales; the workdir is not
    changed. An --output over the run's records is refused."""
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    before = tree_hashes(workdir)
    output = tmp_path / "scores" / "eval.json"
    result = cli(*main_command(config, workdir, "--mode=eval", f"--output={output}")[2:])
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(output.read_text())
    assert record["step"] == 4 and record["scales"] == list(config.model.scales)
    run = experiment.setup_run(config)
    state, _ = restore_template(config)
    state = checkpoint.restore_for_reading(checkpoint.open_for_reading(str(workdir)), state,
                                           np.asarray(jax.random.split(
                                               jax.random.PRNGKey(config.seed))[1]),
                                           config=config)[0]
    device_state = run.layout.put_state(state)
    confusion = np.zeros((config.model.num_classes,) * 2)
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    for batch in pipeline.eval_batches(config.data, batch_size=config.eval.batch_size,
                                       ignore_label=255, num_classes=config.model.num_classes):
        confusion += np.asarray(run.layout.host(run.eval_step(device_state,
                                                              run.layout.put_batch(batch)))[0])
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert confusion.sum() > 0
    np.testing.assert_allclose(record["per_class_iou"], np.nan_to_num(iou), atol=1e-6)
    assert record["miou"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert tree_hashes(workdir) == before
    refused = cli(*main_command(config, workdir, "--mode=eval",
                                f"--output={workdir}/run.json")[2:])
    assert refused.returncode != 0 and "--output" in refused.stderr
    assert tree_hashes(workdir) == before


def test_same_size_damage_is_named_and_stops_a_reader(trained, tmp_path):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    damage_same_size(workdir, 4)
    state, rng = restore_template(config)
    with pytest.raises(checkpoint.DamagedCheckpoint) as error:
        checkpoint.restore_for_reading(checkpoint.open_for_reading(str(workdir)), state, rng,
                                       config=config)
    assert re.fullmatch(
        rf"checkpoint {workdir}/checkpoints/4 is damaged: array state/\S+ does not match the "
        rf"checksum saved with it( and \d+ more array\(s\))? \(the files changed after they "
        rf"were written\)\. Restore its files, delete the step, or pass --checkpoint_fallback "
        rf"to use the newest good step\.", str(error.value)), str(error.value)


def test_training_sets_a_damaged_step_aside_and_resumes_from_the_previous(trained, tmp_path,
                                                                          caplog):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    damage_same_size(workdir, 4)
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-3").mkdir()  # killed during a save
    state, rng = restore_template(config)
    manager = checkpoint.make_manager(str(workdir), 5, training=True)
    assert not (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-3").exists()
    with caplog.at_level(logging.WARNING):
        _, _, meta = checkpoint.restore_latest(manager, state, rng, config=config,
                                               writable=True)
    assert meta["step"] == 2
    assert f"{workdir}/checkpoints/4 damaged (array " in caplog.text
    assert [p.name.split("-")[0] for p in (workdir / checkpoint.UNREADABLE_DIR).iterdir()] == [
        "4"]
    assert checkpoint.make_manager(str(workdir), 5).all_steps() == [2]


def test_a_step_without_its_arrays_is_named_not_a_library_error(trained, tmp_path):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "4" / "tree")  # e.g. a copy cut short
    state, rng = restore_template(config)
    manager = checkpoint.open_for_reading(str(workdir))
    with pytest.raises(checkpoint.DamagedCheckpoint) as error:
        checkpoint.restore_for_reading(manager, state, rng, config=config)
    assert str(error.value).startswith(f"checkpoint {workdir}/checkpoints/4 is damaged: its "
                                       f"array data (tree/) is missing")
    _, _, meta = checkpoint.restore_for_reading(manager, state, rng, config=config,
                                                fallback=True)
    assert meta["step"] == 2


# ------------------------------------------------------------------ saved config ---


@pytest.mark.parametrize("key, value, saved, entry_points", [
    ("model.fc6_dilation", 3, 2, ("eval", "predict", "resume")),  # same shapes, other maths
    ("data.std", (32.0, 32.0, 32.0), [64.0, 64.0, 64.0], ("eval",)),
])
def test_another_model_definition_stops_eval_predict_and_resume(trained, tmp_path, key,
                                                                value, saved, entry_points):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    other = config.copy_and_resolve_references()
    section, name = key.split(".")
    other[section][name] = value
    attempts = {"eval": lambda: experiment.evaluate_checkpoint(other, str(workdir)),
                "predict": lambda: inference.restore_trained(other, str(workdir)),
                "resume": lambda: loop.train_and_evaluate(other, str(workdir))}
    for entry in entry_points:
        with pytest.raises(checkpoint.CheckpointError) as error:
            attempts[entry]()
        assert f"was trained with another model ({key}: saved {saved!r}, now" in str(
            error.value)
        assert f"run with --config.{key}=" in str(error.value)
    assert checkpoint.make_manager(str(workdir), 5).all_steps() == [2, 4]


# ------------------------------------------------------------- lock and signals ---


def read_until(child, needle: str, seen: list, timeout=240) -> str:
    deadline = time.time() + timeout
    for line in child.stdout:
        seen.append(line)
        if needle in line:
            return line
        assert time.time() < deadline, "".join(seen)[-3000:]
    raise AssertionError(f"{needle!r} never came:\n" + "".join(seen)[-3000:])


def test_one_training_run_per_workdir_and_sigint_saves_and_exits_75(trained, tiny_config,
                                                                  tmp_path):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    long = tiny_config(steps=100_000)
    long.train.checkpoint_every, long.train.log_every = 100_000, 10
    command = main_command(long, workdir)
    first = subprocess.Popen(command, cwd=REPO, env=subprocess_env(1), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    try:
        read_until(first, "Resuming at step 4.", seen)
        name = re.search(r"Model (\S+):", read_until(first, "Model ", seen)).group(1)
        assert name == "demo_attention+fc_width=64+width=0.0625", name  # overrides named

        second = cli(*command[2:])  # the same training again, on the same workdir
        one_line_error(second, f"{workdir} is in use by another training run (pid "
                               f"{first.pid} on host {socket.gethostname()}")

        holder = json.loads((workdir / runlock.LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        # A read-only mode runs beside it.
        assert checkpoint.open_for_reading(str(workdir)).latest_step() == 4

        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
        seen.append(first.stdout.read())
    finally:
        first.kill()
    log = "".join(seen)
    assert first.returncode == 75, log[-3000:]
    assert "SIGINT received: saving a checkpoint at the next step boundary" in log
    stopped = int(re.search(r"Preempted: saved step (\d+)", log).group(1))
    assert "Traceback" not in log and log.rstrip().splitlines()[-1] == (
        f"stopped: stopped by SIGINT after step {stopped}; checkpoint saved, rerun the same "
        f"command to resume")
    assert stopped > 4 and stopped in checkpoint.make_manager(str(workdir), 5).all_steps()
    assert not (workdir / runlock.LOCK_FILE).exists()  # released

    # Again; Ctrl-C twice before the first step boundary: stop at once, exit 130.
    again = subprocess.Popen(command, cwd=REPO, env=subprocess_env(1), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    try:
        read_until(again, f"Resuming at step {stopped}.", seen)
        again.send_signal(signal.SIGINT)
        read_until(again, "SIGINT received", seen)
        again.send_signal(signal.SIGINT)
        again.wait(timeout=120)
        seen.append(again.stdout.read())
    finally:
        again.kill()
    log = "".join(seen)
    assert again.returncode == 130, log[-3000:]
    assert "Traceback" not in log and "stopped: interrupted twice (SIGINT)" in log
    assert checkpoint.make_manager(str(workdir), 5).latest_step() == stopped  # nothing new
    assert not (workdir / runlock.LOCK_FILE).exists()


def write_lock(workdir, **fields):
    holder = dict(runlock.holder_info(), **fields)
    (workdir / runlock.LOCK_FILE).write_text(json.dumps(holder))
    return holder


def test_stale_locks_are_taken_over_live_and_foreign_ones_respected(tmp_path, caplog,
                                                                    monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SCALEATTN_JOB_ID", raising=False)
    workdir = tmp_path / "run"
    workdir.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid is not running any more
    write_lock(workdir, pid=ended.pid)
    with caplog.at_level(logging.WARNING), runlock.hold(str(workdir)):
        assert json.loads((workdir / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"from pid {ended.pid} on host {socket.gethostname()}" in caplog.text
    assert "its process is not running" in caplog.text
    assert not (workdir / runlock.LOCK_FILE).exists()

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(workdir, pid=sleeper.pid)  # alive, this host
        with pytest.raises(runlock.WorkdirLocked, match=rf"in use by another training run "
                           rf"\(pid {sleeper.pid} on host .*wait for it to end, stop it"):
            runlock.RunLock(str(workdir)).acquire()
    finally:
        sleeper.kill()

    write_lock(workdir, host="other-node", pid=1234, job_id="")
    with pytest.raises(runlock.WorkdirLocked) as error:
        runlock.RunLock(str(workdir)).acquire()
    assert "(pid 1234 on host other-node" in str(error.value)
    assert f"if that run is gone, delete {workdir / runlock.LOCK_FILE}" in str(error.value)

    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto another node
    write_lock(workdir, host="other-node", pid=1234, job_id="4242")
    with runlock.hold(str(workdir)):
        pass
    assert "it belongs to this job (4242)" in caplog.text
    assert not (workdir / runlock.LOCK_FILE).exists()


def test_a_failing_start_leaves_no_lock_and_no_new_workdir(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(RuntimeError), runlock.hold(str(workdir)):
        assert (workdir / runlock.LOCK_FILE).exists()
        raise RuntimeError("the run failed before writing anything")
    assert not workdir.exists()


def test_sigint_and_sigterm_ask_for_a_save_a_second_sigint_stops_at_once(capfd):
    before = signal.getsignal(signal.SIGINT)
    with preemption.PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signal_name == "SIGTERM"
    exits = []  # what os._exit would have been called with
    with preemption.PreemptionFlag(exit_now=exits.append) as flag:
        flag.on_abort.append(lambda: exits.append("lock released"))
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signal_name == "SIGINT" and not exits
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == ["lock released", 130]
    assert signal.getsignal(signal.SIGINT) is before
    err = capfd.readouterr().err
    assert "SIGTERM received: saving a checkpoint at the next step boundary" in err
    assert "stopped: interrupted twice (SIGINT): stopped at once, without saving" in err


# -------------------------------------------------------------- read-only modes ---


def test_read_only_modes_fall_back_if_asked_and_never_change_the_workdir(trained, tmp_path,
                                                                         caplog):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    damage_same_size(workdir, 4)
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-3").mkdir()  # a save in progress
    before = tree_hashes(workdir)
    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "x.png")
    predict.predict_files(config, str(workdir), [str(tmp_path / "x.png")],
                          str(tmp_path / "pictures"), fallback=True)
    with caplog.at_level(logging.WARNING):
        assert 0 <= experiment.evaluate_checkpoint(config, str(workdir), fallback=True)["miou"] <= 1
    assert f"Using the previous good checkpoint {workdir}/checkpoints/2 (step 2)" in caplog.text
    assert "does not match the checksum" in caplog.text
    with pytest.raises(checkpoint.CheckpointError):
        predict.predict_files(config, str(workdir), [str(tmp_path / "x.png")],
                              str(tmp_path / "more"))  # damaged newest step, no fallback
    assert tree_hashes(workdir) == before
    assert not (tmp_path / "more").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    for attempt in (lambda: experiment.evaluate_checkpoint(config, str(empty)),
                    lambda: experiment.evaluate_checkpoint(config, str(tmp_path / "missing"))):
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*train first"):
            attempt()
    assert not os.listdir(empty) and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------- images ---


def cmyk_to_rgb(cmyk):
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    return np.stack([(255 - v) * (255 - k) / 255 for v in (c, m, y)], -1)


def ycbcr_to_rgb(ycc):  # ITU-R BT.601, full range (JPEG)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    return np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1).clip(0, 255)


def lab_grey_to_srgb(lab):
    """Neutral LAB (a* = b* = 0) -> the sRGB grey: L* -> luminance -> sRGB companding."""
    lightness = lab[..., 0].astype(np.float64) * 100 / 255
    y = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)
    v = np.where(y > 0.0031308, 1.055 * y ** (1 / 2.4) - 0.055, 12.92 * y)
    return np.repeat((v * 255)[..., None], 3, -1)


def grey3(values):
    return np.repeat(np.asarray(values, np.float64)[..., None], 3, -1)


RNG = np.random.default_rng(3)
U8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
U16 = np.array([[0, 128, 129, 257, 25700, 32896, 65535]], np.uint16)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
CMYK = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
YCC = np.stack([RNG.integers(16, 236, (5, 7)), RNG.integers(100, 156, (5, 7)),
                RNG.integers(100, 156, (5, 7))], -1).astype(np.uint8)
# PIL's LAB pixels hold a* and b* as signed bytes (TIFF's CIELAB): 0 is neutral grey.
LAB = np.stack([RNG.integers(20, 250, (5, 7)), np.zeros((5, 7)), np.zeros((5, 7))],
               -1).astype(np.uint8)
FLOATS = np.array([[0.0, 0.25, 0.5, 0.999, 1.0]], np.float32)


def palette_image(mode):
    image = Image.fromarray(U8, "P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    return image if mode == "P" else image.convert(mode)


# mode -> (file format, the image, the expected RGB (float), tolerance)
MODES = {
    "1": ("PNG", lambda: Image.fromarray(U8 > 127), lambda: grey3((U8 > 127) * 255.0), 0),
    "L": ("PNG", lambda: Image.fromarray(U8, "L"), lambda: grey3(U8), 0),
    "P": ("PNG", lambda: palette_image("P"), lambda: PALETTE[U8].astype(float), 0),
    "PA": ("TIFF", lambda: palette_image("PA"), lambda: PALETTE[U8].astype(float), 0),
    "LA": ("PNG", lambda: Image.fromarray(np.stack([U8, U8[::-1]], -1), "LA"),
           lambda: grey3(U8), 0),
    "RGB": ("PNG", lambda: Image.fromarray(RGBA[..., :3], "RGB"),
            lambda: RGBA[..., :3].astype(float), 0),
    "RGBA": ("PNG", lambda: Image.fromarray(RGBA, "RGBA"), lambda: RGBA[..., :3].astype(float),
             0),
    "CMYK": ("TIFF", lambda: Image.fromarray(CMYK, "CMYK"), lambda: cmyk_to_rgb(CMYK), 1),
    "YCbCr": ("TIFF", lambda: Image.fromarray(YCC, "YCbCr"), lambda: ycbcr_to_rgb(YCC), 2),
    "LAB": ("TIFF", lambda: Image.fromarray(LAB, "LAB"), lambda: lab_grey_to_srgb(LAB), 2),
    "I;16": ("PNG", lambda: Image.fromarray(U16),
             lambda: grey3([[0, 0, 1, 1, 100, 128, 255]]), 0),
    "I;16B": ("TIFF", lambda: Image.fromarray(U16.astype(">u2")),
              lambda: grey3([[0, 0, 1, 1, 100, 128, 255]]), 0),
    "I": ("TIFF", lambda: Image.fromarray(U16.astype(np.int32)),
          lambda: grey3([[0, 0, 1, 1, 100, 128, 255]]), 0),
    "F": ("TIFF", lambda: Image.fromarray(FLOATS),
          lambda: grey3([[0, 64, 128, 255, 255]]), 0),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_pil_mode_is_read_as_8bit_rgb(tmp_path, mode):
    fmt, make, expected, tolerance = MODES[mode]
    path = tmp_path / f"image.{fmt.lower()}"
    make().save(path, format=fmt)
    with Image.open(path) as image:
        assert image.mode == mode  # the file really holds this mode
    rgb = predict.load_image(str(path))
    assert rgb.dtype == np.uint8 and rgb.shape == expected().shape
    np.testing.assert_allclose(rgb, expected(), atol=tolerance + 0.5)


@pytest.mark.parametrize("mode, values, message", [
    ("I", np.array([[0, 70000]], np.int32), "32-bit integer pixels from 0 to 70000"),
    ("I", np.array([[-5, 10]], np.int32), "32-bit integer pixels from -5 to 10"),
    ("F", np.array([[0.0, 255.0]], np.float32), "float pixels outside 0..1 (from 0 to 255)"),
    ("F", np.array([[0.0, np.nan]], np.float32), "float pixels outside 0..1"),
])
def test_out_of_range_high_depth_images_are_refused_by_name(tmp_path, mode, values, message):
    path = tmp_path / "deep.tiff"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(predict.InputError, match=re.escape(f"image {path} has {message}")):
        predict.load_image(str(path))


def png_header(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` 8-bit grey pixels (no pixel data)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_images_beyond_the_limit_and_decompression_bombs_are_refused(tmp_path):
    big, bomb = tmp_path / "big.png", tmp_path / "bomb.png"
    big.write_bytes(png_header(6000, 6000))  # 36 million > 25 million
    bomb.write_bytes(png_header(20000, 20000))  # beyond PIL's own guard too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning stays quiet
        with pytest.raises(predict.InputError, match=re.escape(
                f"image {big} is 6000x6000 pixels (36.0 million), more than the 25 million")):
            predict.load_image(str(big))
        with pytest.raises(predict.InputError, match=re.escape(
                f"image {bomb} is too large (400.0 million pixels): --mode=predict reads at "
                f"most 25 million")):
            predict.load_image(str(bomb))


def test_a_bad_input_stops_predict_before_any_output_unless_skipped(trained, tmp_path,
                                                                    caplog):
    config, workdir = trained
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(RGBA[..., :3]).resize((30, 20)).save(folder / "a.png")
    Image.fromarray(RGBA[..., :3]).resize((30, 20)).save(folder / "b.png")
    (folder / "b.png").write_bytes((folder / "b.png").read_bytes()[:60])  # truncated
    (folder / "c.png").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(predict.InputError) as error:
        predict.predict_files(config, str(workdir), [str(folder)], str(out))
    assert str(error.value).startswith(f"cannot read image {folder / 'b.png'}: ")
    assert "(and 1 more unreadable input(s)); nothing was written" in str(error.value)
    assert "--skip_bad_inputs" in str(error.value) and not out.exists()

    with caplog.at_level(logging.WARNING):
        written = predict.predict_files(config, str(workdir), [str(folder)], str(out),
                                        skip_bad_inputs=True)
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in written)
    assert all(os.path.basename(p).startswith("a_") for p in written)
    assert "Skipped 2 unreadable input(s)" in caplog.text
    assert f"cannot read image {folder / 'c.png'}: not an image file" in caplog.text


# ------------------------------------------------------------------ tool errors ---


def test_every_tool_says_what_is_wrong_in_one_line(trained, tmp_path):
    config, workdir = trained
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "no_function.py").write_text("x = 1\n")
    (tmp_path / "a_file").write_text("")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "huge.png").write_bytes(png_header(6000, 6000))
    main = [sys.executable, "-m", "scaleattn.main"]
    tiny = ["--config=configs/demo.py", *demo_config_flags(config)]
    fresh = tmp_path / "fresh"
    cases = {  # name: (argv, fragments of the one error line)
        "missing config": (main + ["--config=configs/nope.py", f"--workdir={fresh}"],
                           ["--config=configs/nope.py: no such file"]),
        "config syntax": (main + [f"--config={tmp_path / 'syntax.py'}", f"--workdir={fresh}"],
                          ["does not parse: invalid syntax (line 1)"]),
        "no get_config": (main + [f"--config={tmp_path / 'no_function.py'}",
                                  f"--workdir={fresh}"], ["has no get_config() function"]),
        "bench dtype": (main + tiny + ["--mode=bench", "--config.bench.dtypes=float32,fp8"],
                        ["config.bench.dtypes has 'fp8', not one of"]),
        "bench output": (main + tiny + ["--mode=bench", f"--output={tmp_path}"],
                         [f"--output={tmp_path} is a folder"]),
        "init_from": (main + tiny + [f"--workdir={fresh}", "--config.model.init_from="
                                     f"{tmp_path / 'gone.msgpack'}"],
                      [f"{tmp_path / 'gone.msgpack'} does not exist", "scaleattn.convert"]),
        "eval empty": (main + tiny + ["--mode=eval", f"--workdir={fresh}"],
                       [f"no checkpoint in {fresh}/checkpoints: train first"]),
        "predict output file": (main + tiny + [
            "--mode=predict", f"--workdir={workdir}", f"--input={tmp_path / 'x.png'}",
            f"--output={tmp_path / 'a_file'}"], [f"{tmp_path / 'a_file'} is a file"]),
        "predict huge image": (main + tiny + [
            "--mode=predict", f"--workdir={workdir}", f"--input={tmp_path / 'huge.png'}",
            f"--output={tmp_path / 'out'}"], ["huge.png is 6000x6000 pixels", "nothing was "
                                              "written", "--skip_bad_inputs"]),
        "predict all skipped": (main + tiny + [
            "--mode=predict", f"--workdir={workdir}", f"--input={tmp_path / 'huge.png'}",
            f"--output={tmp_path / 'out'}", "--skip_bad_inputs"],
            ["none of the 1 input image(s) can be read"]),
        "predict read-only": (main + tiny + [
            "--mode=predict", f"--workdir={workdir}", f"--input={tmp_path / 'x.png'}",
            f"--output={read_only_dir(tmp_path)}/out"], ["cannot write in", "choose a writable"]),
    }
    results = run_all({name: argv for name, (argv, _) in cases.items()})
    for name, (_, fragments) in cases.items():
        print(name, "->", one_line_error(results[name], *fragments))
    assert not fresh.exists() and not (tmp_path / "out").exists()  # nothing left behind


def test_report_refuses_records_that_are_not_run_records(tmp_path, capsys):
    good = {"name": "demo_attention", "steps": 4, "miou": 0.5, "config": {}}
    cases = {
        "list": ([good], "holds a JSON list, not a run record"),
        "empty object": ({}, "is not a complete run record: it lacks 'name', 'steps', "
                             "'config', 'miou'"),
        "wrong type": (dict(good, steps="four"), "field 'steps' is \"four\", expected an "
                                                 "integer"),
        "boolean": (dict(good, miou=True), "field 'miou' is true, expected a number or null"),
        "percent": (dict(good, miou=57.3), "field 'miou' is 57.3, expected a fraction in 0..1"),
    }
    for name, (record, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps(record))
        assert report.main([str(folder)]) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "run.json").write_text("")
    assert report.main([str(tmp_path / "blank")]) == 1
    assert "run.json cannot be read" in capsys.readouterr().err

    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "run.json").write_text(json.dumps(good))
    for target, message in ((tmp_path, "is a folder"),
                            (f"{read_only_dir(tmp_path)}/table.md", "cannot write in")):
        assert report.main([str(tmp_path / "ok"), f"--output={target}"]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and not captured.out
    assert report.main([str(tmp_path / "ok"), f"--output={tmp_path / 'table.md'}"]) == 0
    assert "| ok | demo_attention |" in (tmp_path / "table.md").read_text()


def test_convert_refuses_an_unwritable_destination_before_any_work(tmp_path, capsys):
    from scaleattn import convert  # pylint: disable=import-outside-toplevel
    folder = tmp_path / "weights"
    folder.mkdir()
    for dst, message in ((folder, f"DST={folder} is a folder"),
                         (f"{read_only_dir(tmp_path)}/w.msgpack", "cannot write in")):
        assert convert.main(["--from=torchvision", "--arch=resnet50", str(tmp_path / "src.pth"),
                             str(dst)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not os.listdir(folder)


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def fails_half_way(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        outputs.atomic_write(str(target), fails_half_way)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]
    outputs.atomic_write(str(target), "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["result.json"]


def test_data_tools_name_the_bad_place(tmp_path, capsys):
    from benchmarks import input_pipeline  # pylint: disable=import-outside-toplevel
    from scaleattn.data import build  # pylint: disable=import-outside-toplevel
    (tmp_path / "a_file").write_text("")
    cases = [
        (build.main, [f"--data_dir={read_only_dir(tmp_path)}/data", f"--manual_dir={tmp_path}"],
         1, "cannot write in"),
        (build.main, [f"--data_dir={tmp_path / 'data'}", f"--manual_dir={tmp_path / 'a_file'}"],
         1, "is a file; give the folder that holds VOCtrainval_11-May-2012.tar"),
        (input_pipeline.main, ["--crop=321,big"], 2, "--crop=321,big: comma-separated integers"),
        (input_pipeline.main, [f"--output={tmp_path}"], 2, f"--output={tmp_path} is a folder"),
        (input_pipeline.main, ["--seconds=0"], 2, "--seconds must be positive"),
    ]
    for main, argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "data").exists()


def test_launchers_name_a_missing_command_in_one_line(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = dict(os.environ, PATH=str(empty_path))  # no sbatch, no gcloud
    for script, args, fragment in (
            ("slurm_gpu.py", [f"--workdir={tmp_path / 'run'}"],
             "sbatch: command not found; run this on a SLURM login node"),
            ("tpu_vm.py", ["up", "--name=sa", "--project=p", "--zone=z"],
             "gcloud: command not found; install the Google Cloud SDK")):
        result = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                                capture_output=True, text=True, timeout=60, env=env)
        one_line_error(result, fragment)


# ------------------------------------------- saved state, resume, outputs, machine ---


@pytest.mark.parametrize("steps", [4, 1])
def test_an_overflowing_update_is_never_saved_and_names_the_arrays(tiny_config, tmp_path,
                                                                   steps):
    """base_lr=1e38: the first loss is finite, its update is not; with a checkpoint
    every step (and with a 1-step run, whose only save is its last) nothing is saved,
    the stop names the step and the arrays, and no run.json claims a result."""
    config = tiny_config(steps)
    config.optim.base_lr, config.train.checkpoint_every = 1e38, 1
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"the state of step 1 holds NaN/Inf values in params/\S+.* "
                             r"no checkpoint was saved yet"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == []
    assert not (tmp_path / "run.json").exists()


def poison(workdir, step, config):
    """Rewrites ``step`` with a NaN in one parameter, as a version that did not check
    the state before saving would have written it."""
    from test_faults import save_unchecked  # pylint: disable=import-outside-toplevel
    manager = checkpoint.make_manager(str(workdir), 5, training=True, async_save=False)
    tree, _ = checkpoint.read(manager, step)
    first = sorted(jax.tree_util.tree_leaves_with_path(tree["state"]["params"]),
                   key=lambda kv: jax.tree_util.keystr(kv[0]))[0][1]
    first.reshape(-1)[0] = np.nan
    manager.delete(step)
    save_unchecked(manager, step, tree["state"], config)


def test_eval_and_predict_refuse_a_non_finite_checkpoint_fallback_skips_it(trained, tmp_path):
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    poison(workdir, 4, config)
    for read in (lambda **kw: experiment.evaluate_checkpoint(config, str(workdir), **kw),
                 lambda **kw: inference.restore_trained(config, str(workdir), **kw)):
        with pytest.raises(checkpoint.NonFiniteCheckpoint, match=r"checkpoints/4 holds NaN/Inf"):
            read()
    assert inference.restore_trained(config, str(workdir), fallback=True)[2] == 2


def test_eval_never_reports_a_metric_of_nan_scores(trained):
    config, workdir = trained
    run = experiment.setup_run(config)
    model, state, _ = inference.restore_trained(config, str(workdir))
    state = state.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, state.params))
    with pytest.raises(inference.NonFiniteScores, match="NaN/Inf values on eval batch 0"):
        experiment.evaluate(run, run.layout.put_state(state))
    with pytest.raises(inference.NonFiniteScores):
        predict.predict_image(inference.Predictor(model), state,
                              np.zeros((20, 20, 3), np.uint8), config.data)


def test_resume_records_its_real_start_and_reads_on_by_images(trained, tiny_config, tmp_path):
    """A resumed run's run.json names where the run started (not a model.init_from it
    never loaded) and the step it resumed at; a new batch size continues at the image."""
    workdir = copy_run(trained, tmp_path)
    config = tiny_config(6)
    config.model.init_from = str(tmp_path / "never_loaded.msgpack")
    config.batch_size, config.eval.batch_size = 4, 4
    loop.train_and_evaluate(config, str(workdir))
    record = json.loads((workdir / "run.json").read_text())
    assert record["start"] == "scratch" and record["resumed_at_step"] == 4
    _, meta = checkpoint.read(checkpoint.make_manager(str(workdir), 5), 6, tree=False)
    assert meta["data_position_images"] == 4 * 8 + 2 * 4 and meta["batch_size"] == 4


def test_eval_beside_training_reads_the_newest_step_after_a_rotation(trained, tmp_path):
    """The steps a reader listed are rotated away by a training run before it reads
    them: it lists again and evaluates the newest instead of 'no checkpoint'."""
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    steps = workdir / "checkpoints"
    shutil.move(steps / "4", tmp_path / "4")
    manager = checkpoint.open_for_reading(str(workdir))  # lists [2]
    shutil.rmtree(steps / "2")                          # rotated away ...
    shutil.move(tmp_path / "4", steps / "4")            # ... by a newer step
    state, rng = restore_template(config)
    _, _, meta = checkpoint.restore_for_reading(manager, state, rng, config=config)
    assert meta["step"] == 4


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_during_a_save_stops_in_one_line_and_keeps_the_last_checkpoint(
        trained, tmp_path, async_save):
    """The file-size limit (RLIMIT_FSIZE, what a full disk looks like to a writer) hits
    the step-6 save of a resumed run: one line naming the intact step 4, which a rerun
    resumes from."""
    config, _ = trained
    workdir = copy_run(trained, tmp_path)
    record = (workdir / "run.json").read_bytes()
    longer = config.copy_and_resolve_references()
    longer.train.steps, longer.train.async_checkpoints = 6, async_save
    # bash sets the limit for the child alone; SIGXFSZ ignored: writes fail with EFBIG
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 40; exec \"$@\"", "bash",
               *main_command(longer, workdir)]
    result = subprocess.run(limited, cwd=REPO, env=subprocess_env(1), capture_output=True,
                            text=True, timeout=300)
    one_line_error(result, f"cannot write checkpoints in {workdir}/checkpoints (File too large)",
                   "the newest complete checkpoint (step 4) is intact")
    assert checkpoint.complete_steps(workdir / "checkpoints") == [2, 4]
    assert (workdir / "run.json").read_bytes() == record  # the 4-step record, untouched
    manager = checkpoint.make_manager(str(workdir), 5)
    assert checkpoint.read(manager, 4)[1]["step"] == 4  # checksums verified


def test_outputs_over_inputs_and_records_are_refused_by_every_tool(trained, tmp_path):
    config, workdir = trained
    run = copy_run(trained, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.png")
    (run / "run.json").write_text("{}")
    before = tree_hashes(run)
    main = [sys.executable, "-m", "scaleattn.main", "--config=configs/demo.py",
            *demo_config_flags(config), f"--workdir={run}"]
    cases = {
        "crf_search over run.json": (main + ["--mode=crf_search", f"--output={run}/run.json"],
                                     "the run's own run.json"),
        "predict into its input": (main + ["--mode=predict", f"--input={images}",
                                           f"--output={images}"], "is also an input"),
        "predict into a folder of inputs": (main + ["--mode=predict", f"--input={images}/x.png",
                                                    f"--output={tmp_path}"], "holds the input"),
        "predict into checkpoints": (main + ["--mode=predict", f"--input={images}",
                                             f"--output={run}/checkpoints/4"],
                                     "which the training run owns"),
        "analyze into checkpoints": (main + ["--mode=analyze", f"--output={run}/checkpoints"],
                                     "which the training run owns"),
        "bench over the config": (main + ["--mode=bench", f"--output={REPO}/configs/demo.py"],
                                  "is also an input"),
        "JAX_PLATFORMS=cuda": (main + ["--mode=bench", "--config.bench.steps=1"],
                               "JAX_PLATFORMS=cuda: JAX cannot start that backend"),
    }
    env = dict(subprocess_env(1), JAX_PLATFORMS="cuda")
    children = {name: subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE,
                                       env=env if "cuda" in name else subprocess_env(1))
                for name, (argv, _) in cases.items()}
    for name, child in children.items():
        out, err = child.communicate(timeout=240)
        print(name, "->", one_line_error(subprocess.CompletedProcess(child.args,
                                                                     child.returncode, out,
                                                                     err), cases[name][1]))
    assert tree_hashes(run) == before and os.listdir(images) == ["x.png"]
