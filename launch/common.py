"""What the launchers share: running (or, with --dry-run, printing) shell commands.

The launchers are plain Python (standard library only): they run on the machine you
submit from, which needs ``gcloud`` (Cloud TPU) or ``sbatch`` (SLURM), not JAX.
"""

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Shell:
    """Runs commands, or prints them (``dry_run``) exactly as they would run."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def comment(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def run(self, argv: list[str], *, check: bool = True, capture: bool = False) -> str:
        """Runs ``argv`` (no shell); returns its stdout when ``capture``."""
        print(shlex.join(argv), file=self.out, flush=True)
        if self.dry_run:
            return ""
        result = subprocess.run(argv, check=check, text=True,
                                stdout=subprocess.PIPE if capture else None)
        return result.stdout or ""


def train_arguments(args: argparse.Namespace) -> list[str]:
    """``--config=... --workdir=... [--config.data.data_dir=...] [overrides]`` for main."""
    argv = [f"--config={args.config}", f"--workdir={args.workdir}"]
    if getattr(args, "data_dir", None):
        argv.append(f"--config.data.data_dir={args.data_dir}")
    return argv + list(args.overrides)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher arguments before ``--``, ``python -m scaleattn.main`` overrides after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []
