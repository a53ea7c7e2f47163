"""The launchers, through --dry-run: the exact gcloud / sbatch commands they would run."""
import os
import shlex
import stat
import subprocess
import sys

import pytest

from scaleattn import config as config_lib
from scaleattn import main as scaleattn_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, check=True):
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                            capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(output: str) -> list[list[str]]:
    return [shlex.split(line) for line in output.splitlines()
            if line.strip() and not line.startswith("#")]


def flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def check_main_arguments(argv: list[str]):
    """Every argument is a flag of scaleattn.main or a key of the config."""
    for arg in argv:
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("config."):
            config_lib.lookup(config_lib.base_config(), name[len("config."):])
        else:
            assert name in scaleattn_main.FLAGS, arg


TPU = ["--name=sa", "--project=proj", "--zone=us-central2-b", "--config=configs/voc.py",
       "--workdir=gs://bucket/runs/voc s3", "--data-dir=gs://bucket/tfds", "--dry-run"]


def test_tpu_pod_slice_dry_run_prints_the_whole_lifecycle():
    result = launch("tpu_vm.py", "all", "--accelerator-type=v4-32", *TPU,
                    "--", "--config.batch_size=32", "--config.eval.batch_size=32")
    cmds = commands(result.stdout)
    location = ["--project=proj", "--zone=us-central2-b"]
    preflight, create, describe, archive, scp, install, train, logs, status, delete = cmds
    # first, here, the run compiled for the slice's topology (v4-32: 16 chips, 2x2x4)
    assert preflight[1:] == ["-m", "scaleattn.main", "--config=configs/voc.py",
                             "--mode=preflight", "--topology=v4:2x2x4",
                             "--config.parallel.mode=sharded", "--config.batch_size=32",
                             "--config.eval.batch_size=32"]
    check_main_arguments(preflight[3:])
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "sa-qr",
                      "--node-id=sa", *location, "--accelerator-type=v4-32",
                      "--runtime-version=tpu-ubuntu2204-base"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                            "sa-qr"]
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    for ssh in (install, train, logs, status):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sa"]
        assert ssh[6:8] == location
    assert flag(install, "worker") == "all" and "jax[tpu]" in flag(install, "command")
    assert flag(logs, "worker") == "0"
    assert flag(status, "worker") == "0" and flag(status, "command") == "cat ~/scaleattn.status"
    assert "# status 75 (preempted) or none (slice reclaimed): down, then up .. status " \
           "again, at most 3 times" in result.stdout
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "sa-qr",
                      *location, "--force", "--quiet"]

    # The training command, as every worker's shell will read it: the run, detached, then
    # its exit status into ~/scaleattn.status.
    assert flag(train, "worker") == "all"
    remote = shlex.split(flag(train, "command"))
    assert remote[:12] == ["cd", "~/scaleattn", "&&", "rm", "-f", "~/scaleattn.status", "&&",
                           "setsid", "nohup", "bash", "-c", remote[11]]
    assert remote[12:] == [">", "~/scaleattn.log", "2>&1", "<", "/dev/null", "&"]  # detached
    run, then = remote[11].rsplit("; ", 1)
    assert then == "echo $? > ~/scaleattn.status"
    inner = shlex.split(run)
    assert inner[0] == "SCALEATTN_JOB_ID=sa"  # a restarted run may take over the lock
    main = inner[1:]
    assert main[:3] == ["python3", "-m", "scaleattn.main"]
    assert main[3:] == ["--config=configs/voc.py", "--workdir=gs://bucket/runs/voc s3",
                        "--config.data.data_dir=gs://bucket/tfds", "--config.batch_size=32",
                        "--config.eval.batch_size=32", "--distributed",
                        "--config.parallel.mode=sharded"]
    check_main_arguments(main[3:])


def test_tpu_v5e_spot_and_argument_errors():
    cmds = commands(launch("tpu_vm.py", "up", "--accelerator-type=v5litepod-16", "--spot",
                           *TPU).stdout)
    assert "--topology=v5e:4x4" in cmds[0]  # the pre-flight before the slice is created
    assert "--runtime-version=v2-alpha-tpuv5-lite" in cmds[1] and cmds[1][-1] == "--spot"
    cmds = commands(launch("tpu_vm.py", "up", "--accelerator-type=v5litepod-16",
                           "--skip-preflight", *TPU).stdout)
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    result = launch("tpu_vm.py", "train", "--name=sa", "--project=p", "--zone=z", "--dry-run",
                    check=False)
    assert result.returncode == 2 and "--workdir is required" in result.stderr
    result = launch("tpu_vm.py", "up", "--accelerator-type=v9-8", *TPU, check=False)
    assert result.returncode == 2 and "--runtime-version" in result.stderr


def slurm_script(tmp_path, *extra) -> tuple[str, list[str]]:
    result = launch("slurm_gpu.py", "--nodes=2", "--gpus-per-node=8", "--partition=gpu",
                    f"--workdir={tmp_path / 'run'}", f"--repo={tmp_path}", "--dry-run", *extra,
                    "--", "--config.batch_size=32")
    lines = result.stdout.splitlines()
    assert lines[0] == f"# batch script {tmp_path / 'run' / 'scaleattn.sbatch'}:"
    assert lines[-1] == f"sbatch {tmp_path / 'run' / 'scaleattn.sbatch'}"
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    return "\n".join(lines[1:-1]) + "\n", lines


def test_slurm_dry_run_prints_a_valid_batch_script(tmp_path):
    script, _ = slurm_script(tmp_path)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = [line.split(" ", 1)[1] for line in script.splitlines()
                  if line.startswith("#SBATCH")]
    for expected in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue",
                     "--signal=TERM@300", "--partition=gpu"):
        assert expected in directives
    srun = next(shlex.split(line) for line in script.splitlines() if line.startswith("srun"))
    main = srun[srun.index("python"):]
    assert main[:3] == ["python", "-m", "scaleattn.main"]
    assert main[3:] == ["--config=configs/voc.py", f"--workdir={tmp_path / 'run'}",
                        "--config.batch_size=32", "--distributed",
                        "--config.parallel.mode=sharded"]
    check_main_arguments(main[3:])


@pytest.mark.parametrize("srun_status, requeued", [
    (75, True),    # stopped by SIGTERM (preemption / time limit) after saving: requeue
    (0, False),    # finished
    (1, False),    # failed: do not loop
    (137, False),  # a task killed (e.g. out of memory, or by srun --wait): do not loop
])
def test_slurm_script_requeues_only_a_run_stopped_early(tmp_path, srun_status, requeued):
    script, _ = slurm_script(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", f"echo \"$@\" > {tmp_path}/srun.args\nexit {srun_status}"),
                       ("scontrol", f"echo \"$@\" > {tmp_path}/scontrol.args")):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    (tmp_path / "job.sbatch").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42")
    result = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == srun_status, result.stderr
    assert "scaleattn.main" in (tmp_path / "srun.args").read_text()
    assert (tmp_path / "scontrol.args").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]


@pytest.mark.parametrize("statuses, passes, exit_code", [
    ("75 0", 2, 0),      # preempted once, then finished
    ("75 75 75", 2, 1),  # still preempted after --max-restarts=1: give up, non-zero
    ("1", 1, 1),         # failed: no restart
    ("", 2, 1),          # no status (the slice was reclaimed): restart, then give up
])
def test_tpu_all_starts_over_only_after_a_preemption(tmp_path, statuses, passes, exit_code):
    """`all` against a stand-in gcloud (and git) that records its calls; worker 0's
    status file says ``statuses``, one per pass."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "statuses").write_text("\n".join(statuses.split()) + "\n")
    gcloud = f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *describe*) echo ACTIVE ;;
  *"--command=cat ~/scaleattn.status"*)
    head -n 1 {tmp_path}/statuses; sed -i 1d {tmp_path}/statuses ;;
esac
"""
    for name, body in (("gcloud", gcloud), ("git", f"#!/bin/bash\necho git >> {tmp_path}/calls\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu_vm.py"), "all",
                             "--max-restarts=1", "--skip-preflight",
                             *[a for a in TPU if a != "--dry-run"]],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == exit_code, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("queued-resources create" in c for c in calls) == passes
    assert sum("queued-resources delete" in c for c in calls) == passes
    assert sum("--worker=all --command=cd ~/scaleattn" in c for c in calls) == passes  # train
    assert calls[-1].startswith("compute tpus queued-resources delete sa-qr")


def test_tpu_preflight_that_fails_stops_before_any_slice(tmp_path):
    """A pre-flight that fails (here: a mesh of 3 x n that 4 chips cannot hold, found
    before anything is compiled; the config itself is valid) stops `all` with its
    reason; gcloud is never called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!/bin/bash\necho \"$*\" >> {tmp_path}/calls\n")
    (bin_dir / "gcloud").chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu_vm.py"), "all",
                             "--accelerator-type=v5litepod-4",
                             *[a for a in TPU if a != "--dry-run"], "--",
                             "--config.parallel.mesh_shape=(3,-1)"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "parallel.mesh_shape=(3, -1) does not fit 4 devices" in result.stderr  # its reason
    assert lines[-1].startswith("error: the pre-flight for v5litepod-4 (v5e:2x2) failed")
    assert "--skip-preflight" in lines[-1]
    assert not (tmp_path / "calls").exists()


def test_tpu_topology_names():
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.spec_from_file_location(
        "tpu_vm", os.path.join(REPO, "launch", "tpu_vm.py"),
        submodule_search_locations=None)
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        tpu_vm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tpu_vm)
    finally:
        sys.path.remove(os.path.join(REPO, "launch"))
    # v4 / v5p types count TensorCores (2 per chip), v5e / v6e count chips
    assert tpu_vm.topology("v4-8") == "v4:2x2x1" and tpu_vm.topology("v4-32") == "v4:2x2x4"
    assert tpu_vm.topology("v5p-16") == "v5p:2x2x2"
    assert tpu_vm.topology("v5litepod-64") == "v5e:8x8" and tpu_vm.topology("v6e-4") == "v6e:2x2"
    assert tpu_vm.topology("v4-6") is None and tpu_vm.topology("v9-8") is None
