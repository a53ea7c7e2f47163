#!/usr/bin/env python3
"""Train on several GPU nodes of a SLURM cluster: writes a batch script and submits it.

    python launch/slurm_gpu.py --nodes=2 --gpus-per-node=8 --partition=gpu \\
        --config=configs/voc.py --workdir=/shared/runs/voc_s3 \\
        --venv=/shared/venvs/scaleattn --dry-run -- --config.batch_size=32

The job runs one task per node (``srun``); each is one JAX process driving all GPUs of
its node, and ``jax.distributed.initialize()`` (``--distributed``) reads the coordinator,
process count and index from the SLURM environment. ``parallel.mode`` is ``sharded``
unless ``--parallel-mode`` says otherwise. The repository, the virtualenv, the data and
the workdir must be on a filesystem every node sees (Orbax: each process writes its
shards of a checkpoint).

Preemption and time limits: SLURM sends SIGTERM ``--signal-seconds`` before the end
(``#SBATCH --signal``); the run saves at the next step boundary and exits with status
75 (``PREEMPTED_EXIT``), and the script requeues the job (``--requeue``) on exactly that
status: a finished run (0) or a failed one (anything else) is not requeued. The
requeued job keeps its ``SLURM_JOB_ID``, so its process 0 may take over the workdir's
lock even when it lands on another node. ``srun --wait`` ends the job step 120 s after
the first task ends (a crashed process would leave the others waiting in a collective),
instead of ``--kill-on-bad-exit``, which would kill the other tasks while they finish
their part of the preemption checkpoint.

``--dry-run`` prints the batch script and the ``sbatch`` command without writing or
submitting anything.
"""

import argparse
import os
import shlex

from common import (PREEMPTED_EXIT, REPO, Shell, at_least, check_config, run_main,
                    split_overrides, train_arguments)


def parse(argv: list[str]) -> argparse.Namespace:
    own, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=at_least(1), default=2)
    p.add_argument("--gpus-per-node", type=at_least(1), default=8)
    p.add_argument("--cpus-per-task", type=at_least(1), default=16)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--job-name", default="scaleattn")
    p.add_argument("--signal-seconds", type=at_least(1), default=300,
                   help="SIGTERM this long before the time limit (time to save)")
    p.add_argument("--config", default="configs/voc.py")
    p.add_argument("--workdir", required=True, help="shared directory of the run")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir on a shared filesystem")
    p.add_argument("--repo", default=REPO, help="this repository, as the nodes see it")
    p.add_argument("--venv", default=None, help="virtualenv to activate on the nodes")
    p.add_argument("--parallel-mode", default="sharded", choices=("sharded", "pmap"))
    p.add_argument("--script", default=None,
                   help="where to write the batch script (default WORKDIR/JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print, do not write or submit")
    args = p.parse_args(own)
    args.overrides = overrides
    args.workdir = os.path.abspath(os.path.expanduser(args.workdir))
    args.script = args.script or os.path.join(args.workdir, f"{args.job_name}.sbatch")
    return args


def batch_script(args) -> str:
    """The ``sbatch`` script of the job."""
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                  "--ntasks-per-node=1", f"--gpus-per-node={args.gpus_per_node}",
                  f"--cpus-per-task={args.cpus_per_task}", f"--time={args.time}",
                  f"--signal=TERM@{args.signal_seconds}", "--requeue", "--open-mode=append",
                  f"--output={os.path.join(args.workdir, 'slurm-%j.out')}"]
    if args.partition:
        directives.append(f"--partition={args.partition}")
    if args.account:
        directives.append(f"--account={args.account}")
    main = ["python", "-m", "scaleattn.main", *train_arguments(args), "--distributed",
            f"--config.parallel.mode={args.parallel_mode}"]
    workdir = shlex.quote(args.workdir)
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             "# One task per node = one JAX process driving all of the node's GPUs;",
             "# jax.distributed.initialize() reads SLURM_* for the coordinator and ranks.",
             "set -uo pipefail"]
    if args.venv:
        lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
    lines += [f"cd {shlex.quote(args.repo)}",
              f"mkdir -p {workdir}",
              f"srun --kill-on-bad-exit=0 --wait=120 {shlex.join(main)}",
              "status=$?",
              f"# {PREEMPTED_EXIT}: stopped early by SIGTERM (preemption or the time limit) after "
              f"saving a",
              "# checkpoint: requeue, the next run resumes from it. Finished (0) or failed: stop.",
              f"if [ $status -eq {PREEMPTED_EXIT} ]; then",
              '  echo "run stopped before the end (status $status): requeueing job $SLURM_JOB_ID"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi",
              "exit $status"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    args = parse(argv)
    shell = Shell(args.dry_run)
    check_config(args.config, args.overrides)  # before any plan
    script = batch_script(args)
    shell.comment(f"batch script {args.script}:")
    if args.dry_run:
        print(script, end="", flush=True)
    else:
        os.makedirs(os.path.dirname(args.script), exist_ok=True)
        with open(args.script, "w", encoding="utf-8") as f:
            f.write(script)
    shell.run(["sbatch", args.script])


if __name__ == "__main__":
    run_main(main)
