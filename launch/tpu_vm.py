#!/usr/bin/env python3
"""Train on a Cloud TPU VM pod slice (e.g. v4-32, v5litepod-16) with gcloud.

    python launch/tpu_vm.py all --name=sa-v4 --project=P --zone=us-central2-b \\
        --accelerator-type=v4-32 --config=configs/voc.py \\
        --workdir=gs://BUCKET/runs/voc_s3 --data-dir=gs://BUCKET/tensorflow_datasets \\
        --dry-run -- --config.batch_size=32 --config.eval.batch_size=32

Steps (each is also a sub-command):

* ``preflight``: on this machine (no TPU), compile the run's train and eval steps for
  the slice's topology (``python -m scaleattn.main --mode=preflight``, which needs
  ``pip install -e '.[tpu]'`` here) and stop with its one-line reason when the run
  would not fit, before any capacity is paid for; ``--skip-preflight`` skips it;
* ``up``: create a queued resource holding the slice (``--spot`` for spot capacity)
  and wait until it is ACTIVE;
* ``setup``: copy this repository (``git archive HEAD``) to every worker and install it
  with ``jax[tpu]``;
* ``train``: start ``python3 -m scaleattn.main ... --distributed`` on all workers at
  once, detached (``setsid nohup``), logging to ``~/scaleattn.log`` and leaving its
  exit status in ``~/scaleattn.status``; every worker is one JAX process,
  ``jax.distributed.initialize()`` finds the others from the TPU metadata;
  ``parallel.mode`` is ``sharded`` unless ``--parallel-mode`` says otherwise;
* ``logs``: stream worker 0's log (process 0 logs progress) until the run ends;
* ``status``: worker 0's exit status and what it means;
* ``down``: delete the queued resource and its TPU VMs.

``all`` = preflight, up, setup, train, logs, status, then: if the run was preempted (status 75,
``PREEMPTED_EXIT``: SIGTERM, checkpoint saved) or the slice is gone (a reclaimed spot
slice), down and start over, up to ``--max-restarts`` times, each time resuming from
the checkpoint in the workdir; otherwise down, exiting with the run's status.
``--dry-run`` prints the exact commands of one pass instead of running them. The
workdir must be shared by all workers: a ``gs://`` path (Orbax writes checkpoints
there; each worker writes its own shards). Every pass exports the same
``SCALEATTN_JOB_ID`` (the node name), so the restarted run's process 0 takes over the
workdir's lock left by a run whose slice was reclaimed.
"""

import argparse
import shlex
import sys
import time

from common import (PREEMPTED_EXIT, REPO, LaunchError, Shell, at_least, check_config,
                    run_main, split_overrides, train_arguments)

RUNTIME_VERSIONS = {  # accelerator-type prefix -> TPU VM software version
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ARCHIVE = "/tmp/scaleattn.tar.gz"
REMOTE_DIR = "~/scaleattn"
LOG = "~/scaleattn.log"
STATUS = "~/scaleattn.status"
STEPS = ("preflight", "up", "setup", "train", "logs", "status", "down")
# Accelerator-type prefix -> (JAX's generation name, TensorCores per chip: v4 and v5p
# types count cores, v5e and v6e chips).
GENERATIONS = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5litepod": ("v5e", 1), "v6e": ("v6e", 1)}
# Chips -> the slice's shape (Cloud TPU's default topologies: 3-D tori for v4 / v5p,
# 2-D for v5e / v6e).
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}


def parse(argv: list[str]) -> argparse.Namespace:
    own, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=STEPS + ("all",))
    p.add_argument("--name", required=True, help="TPU VM node name (queued resource: NAME-qr)")
    p.add_argument("--project", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator-type", default="v4-32")
    p.add_argument("--runtime-version", default=None,
                   help="default: by accelerator type (%s)" % RUNTIME_VERSIONS)
    p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    p.add_argument("--config", default="configs/voc.py")
    p.add_argument("--workdir", default=None, help="gs://BUCKET/runs/NAME (shared)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir, e.g. gs://BUCKET/tfds")
    p.add_argument("--parallel-mode", default="sharded", choices=("sharded", "pmap"))
    p.add_argument("--max-restarts", type=at_least(0), default=3,
                   help="all: start over this many times after a preemption")
    p.add_argument("--skip-preflight", action="store_true",
                   help="do not compile the run for the slice's topology before creating it")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(own)
    args.overrides = overrides
    if args.step in ("train", "all") and not args.workdir:
        p.error("--workdir is required to train")
    if args.runtime_version is None:
        prefix = args.accelerator_type.split("-")[0]
        if prefix not in RUNTIME_VERSIONS:
            p.error(f"no default --runtime-version for {args.accelerator_type}")
        args.runtime_version = RUNTIME_VERSIONS[prefix]
    return args


def topology(accelerator_type: str) -> str | None:
    """JAX's name of a Cloud TPU accelerator type's topology (``v4-32`` -> ``v4:2x2x4``,
    ``v5litepod-16`` -> ``v5e:4x4``), or None when it is not a known default shape."""
    prefix, _, count = accelerator_type.partition("-")
    if prefix not in GENERATIONS or not count.isdigit():
        return None
    generation, cores_per_chip = GENERATIONS[prefix]
    chips = int(count) // cores_per_chip
    shape = (SHAPES_3D if cores_per_chip == 2 else SHAPES_2D).get(chips)
    return f"{generation}:{shape}" if shape else None


def preflight(shell: Shell, args) -> None:
    """Compiles the run for the slice's topology here; stops if it would not fit."""
    if args.skip_preflight:
        shell.comment("pre-flight skipped (--skip-preflight)")
        return
    name = topology(args.accelerator_type)
    if name is None:
        raise LaunchError(f"no pre-flight topology for --accelerator-type="
                          f"{args.accelerator_type} (known: {', '.join(GENERATIONS)} with a "
                          f"default slice shape); pass --skip-preflight to launch anyway")
    shell.comment(f"pre-flight: compile the train and eval steps for {name} on this machine "
                  f"(no TPU); stop here if the run would not fit")
    command = [sys.executable, "-m", "scaleattn.main", f"--config={args.config}",
               "--mode=preflight", f"--topology={name}",
               f"--config.parallel.mode={args.parallel_mode}", *args.overrides]
    try:
        shell.run(command)
    except LaunchError as e:
        raise LaunchError(f"the pre-flight for {args.accelerator_type} ({name}) failed: the "
                          f"run would not fit or does not compile (its reason is the line "
                          f"above); nothing was created. Change the config, or pass "
                          f"--skip-preflight to launch anyway") from e


def location(args) -> list[str]:
    return [f"--project={args.project}", f"--zone={args.zone}"]


def ssh(args, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *location(args),
            f"--worker={worker}", f"--command={command}"]


def up(shell: Shell, args) -> None:
    shell.comment(f"queue a {args.accelerator_type} slice and wait until it is ACTIVE")
    shell.run(["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr",
               f"--node-id={args.name}", *location(args),
               f"--accelerator-type={args.accelerator_type}",
               f"--runtime-version={args.runtime_version}"] + (["--spot"] if args.spot else []))
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{args.name}-qr",
                *location(args), "--format=value(state.state)"]
    if shell.dry_run:
        shell.comment("repeated every 30 s until it prints ACTIVE:")
        shell.run(describe)
        return
    while (state := shell.run(describe, capture=True).strip()) != "ACTIVE":
        if state in ("FAILED", "SUSPENDED"):
            sys.exit(f"queued resource {args.name}-qr is {state}")
        time.sleep(30)


def setup(shell: Shell, args) -> None:
    shell.comment("copy the repository (committed HEAD) to every worker and install it")
    shell.run(["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"])
    shell.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.name}:~/",
               *location(args), "--worker=all"])
    install = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/scaleattn.tar.gz -C {REMOTE_DIR} && "
               f"python3 -m pip install -q -U pip && "
               f"python3 -m pip install -q -e {REMOTE_DIR} 'jax[tpu]' google-cloud-storage")
    shell.run(ssh(args, install))


def train_command(args) -> str:
    """The command every worker runs (detached, so that it outlives the ssh session); the
    run's exit status goes to ``STATUS``."""
    main = ["python3", "-m", "scaleattn.main", *train_arguments(args), "--distributed",
            f"--config.parallel.mode={args.parallel_mode}"]
    run = f"SCALEATTN_JOB_ID={shlex.quote(args.name)} {shlex.join(main)}; echo $? > {STATUS}"
    return (f"cd {REMOTE_DIR} && rm -f {STATUS} && setsid nohup bash -c {shlex.quote(run)} "
            f"> {LOG} 2>&1 < /dev/null &")


def train(shell: Shell, args) -> None:
    shell.comment("start one JAX process per worker (jax.distributed finds the others)")
    shell.run(ssh(args, train_command(args)))


def logs(shell: Shell, args) -> None:
    shell.comment("stream process 0's log until the run ends")
    follow = (f"pid=$(pgrep -o -f 'python3 -m [s]caleattn.main'); if [ -n \"$pid\" ]; then "
              f"tail --pid=$pid -n +1 -f {LOG}; else cat {LOG}; fi")
    shell.run(ssh(args, follow, worker="0"), check=False)


MEANINGS = {0: "finished", PREEMPTED_EXIT: "preempted: checkpoint saved, a new run resumes",
            130: "interrupted", None: "unknown: the slice cannot be reached (reclaimed?)"}


def status(shell: Shell, args) -> int | None:
    """Worker 0's exit status of the last run (``None`` if it cannot be read)."""
    shell.comment("the run's exit status on worker 0")
    text = shell.run(ssh(args, f"cat {STATUS}", worker="0"), check=False, capture=True)
    code = int(text.strip()) if text.strip().isdigit() else None
    if not shell.dry_run:
        shell.comment(f"status {code}: {MEANINGS.get(code, 'failed')}")
    return code


def all_steps(shell: Shell, args) -> int:
    """up, setup, train, logs, status; start over after a preemption; down. The status."""
    code = None
    preflight(shell, args)
    for attempt in range(args.max_restarts + 1):
        for step in (up, setup, train, logs):
            step(shell, args)
        code = status(shell, args)
        if shell.dry_run:
            shell.comment(f"status {PREEMPTED_EXIT} (preempted) or none (slice reclaimed): "
                          f"down, then up .. status again, at most {args.max_restarts} times")
            break
        if code not in (PREEMPTED_EXIT, None) or attempt == args.max_restarts:
            break
        shell.comment(f"preempted: starting over ({attempt + 1} of {args.max_restarts})")
        down(shell, args)
    down(shell, args)
    return 0 if code == 0 or shell.dry_run else 1


def down(shell: Shell, args) -> None:
    shell.comment("delete the slice")
    shell.run(["gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr",
               *location(args), "--force", "--quiet"])


def main(argv: list[str]) -> None:
    args = parse(argv)
    shell = Shell(args.dry_run)
    if args.step != "preflight":  # every other step calls gcloud: missing, say so first
        shell.require("gcloud")
    if args.step in ("train", "all"):  # the config is checked before any plan
        shell.comment(f"config: {check_config(args.config, args.overrides)}")
    steps = {"preflight": preflight, "up": up, "setup": setup, "train": train, "logs": logs,
             "status": status, "down": down}
    if args.step == "all":
        sys.exit(all_steps(shell, args))
    if args.step == "up":  # a slice is created only after the pre-flight
        preflight(shell, args)
    steps[args.step](shell, args)


if __name__ == "__main__":
    run_main(main)
