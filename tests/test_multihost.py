"""Two processes on localhost (jax.distributed, CPU collectives over gloo) train like one.

Each child process has 2 fake CPU devices and reads its own half of every global batch
(`train_batches(process_index=...)`); the sharded step builds global arrays from the
two halves. The reference is one process running the jit step on the concatenated
halves. The children then resume in pmap mode from the sharded checkpoint, and a
SIGTERM to process 1 alone makes both save at the same step and exit cleanly.
"""
import re
import signal
import socket
import subprocess

import numpy as np
import pytest
import flax

from scaleattn import checkpoint
from scaleattn.data import pipeline
from scaleout_common import REPO, compiled_run, main_command, run_steps, subprocess_env
from scaleout_common import tiny_config

pytestmark = pytest.mark.slow  # end-to-end: see conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_two_processes(config, workdir, tmp_path, sigterm_after: str | None = None):
    """Runs ``python -m scaleattn.main`` as processes 0 and 1; their outputs.

    ``sigterm_after``: once process 0 logs a line containing it, SIGTERM process 1 only;
    both then save the same step and exit with 75 (preempted).
    """
    expected_status = 0 if sigterm_after is None else 75
    port = free_port()
    logs = [open(tmp_path / f"process_{i}.log", "w+", encoding="utf-8") for i in (0, 1)]
    children = [subprocess.Popen(
        main_command(config, workdir, f"--coordinator_address=localhost:{port}",
                     "--num_processes=2", f"--process_id={i}"),
        cwd=REPO, env=subprocess_env(devices=2), text=True, stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE if i == 0 else logs[1]) for i in (0, 1)]
    for line in children[0].stdout:
        logs[0].write(line)
        if sigterm_after and sigterm_after in line:
            children[1].send_signal(signal.SIGTERM)
            sigterm_after = None
    outputs = []
    for child, log in zip(children, logs):
        child.wait(timeout=120)
        log.seek(0)
        outputs.append(log.read())
        log.close()
        assert child.returncode == expected_status, outputs[-1][-3000:]
    return outputs


def logged_losses(output: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+  loss ([0-9.]+)", output)}


def global_batches(config, steps: int) -> list[dict]:
    """What the two processes feed together: their halves, concatenated."""
    halves = [pipeline.train_batches(config.data, batch_size=config.batch_size // 2,
                                     seed=config.seed, ignore_label=config.loss.ignore_label,
                                     process_index=i, process_count=2)
              for i in (0, 1)]
    return [{k: np.concatenate([a[k], b[k]]) for k in a}
            for a, b in (next(zip(*halves)) for _ in range(steps))]


def saved_params(workdir, step: int) -> dict:
    manager = checkpoint.make_manager(str(workdir), keep=5)
    tree, meta = checkpoint.read(manager, step)
    assert meta["data_position"] == step
    return flax.traverse_util.flatten_dict(tree["state"]["params"], sep="/")


def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
    config = tiny_config("sharded", mesh=(4, 1), param_sharding="fsdp")
    config.data.data_dir = str(tmp_path / "data")
    config.data.demo_train_size, config.data.demo_val_size = 16, 8
    config.batch_size = config.eval.batch_size = 8
    config.train.steps, config.train.checkpoint_every, config.train.log_every = 3, 3, 1
    config.predict.summary_images = 0
    pipeline.ensure_prepared(config.data)  # built once, before the processes start
    workdir = tmp_path / "run"
    outputs = train_two_processes(config, workdir, tmp_path)

    run, state, rng = compiled_run()  # jit on one device, same model and optimiser
    reference, losses = run_steps(run, state, global_batches(config, 3), rng)

    assert "2 process(es), 4 device(s), sharded on mesh data=4 x model=1, fsdp" in outputs[0]
    logged = logged_losses(outputs[0])
    np.testing.assert_allclose([logged[s] for s in (1, 2, 3)], losses, atol=2e-4)
    assert not logged_losses(outputs[1])  # only process 0 logs progress
    assert "eval at step 3: mIoU" in outputs[0]
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    params = saved_params(workdir, 3)  # written by both processes (FSDP shards)
    flat = flax.traverse_util.flatten_dict(reference.params, sep="/")
    assert params.keys() == flat.keys()
    for key in flat:
        np.testing.assert_allclose(params[key], flat[key], rtol=1e-5, atol=1e-6, err_msg=key)

    # Resume in pmap mode (replicated state, process 0 writes); preempt process 1.
    config.parallel.mode, config.parallel.param_sharding = "pmap", "replicated"
    config.train.steps, config.train.checkpoint_every, config.train.eval_at_end = 60, 60, False
    outputs = train_two_processes(config, workdir, tmp_path, sigterm_after="step 5/60")
    assert "Resuming at step 3." in outputs[0]
    stopped = [int(re.search(r"Preempted: saved step (\d+)", out).group(1)) for out in outputs]
    assert stopped[0] == stopped[1] and 5 <= stopped[0] < 60, stopped  # the same step
    print(f"SIGTERM to process 1 after step 5: both saved step {stopped[0]}")
    reference, losses = run_steps(run, reference, global_batches(config, stopped[0])[3:], rng)
    logged = logged_losses(outputs[0])
    np.testing.assert_allclose([logged[s] for s in range(4, stopped[0] + 1)], losses,
                               atol=2e-4)
    params = saved_params(workdir, stopped[0])
    for key, value in flax.traverse_util.flatten_dict(reference.params, sep="/").items():
        np.testing.assert_allclose(params[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
