"""What the launchers share: running (or, with --dry-run, printing) shell commands.

The launchers are plain Python (standard library only): they run on the machine you
submit from, which needs ``gcloud`` (Cloud TPU) or ``sbatch`` (SLURM), not JAX.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m scaleattn.main` exits with this after a SIGTERM (preemption, a time limit)
# or SIGINT once it has saved its checkpoint: rerunning it resumes (scaleattn.main's
# PREEMPTED_EXIT; the launchers do not import scaleattn).
PREEMPTED_EXIT = 75
INSTALL_HINTS = {"gcloud": "install the Google Cloud SDK (https://cloud.google.com/sdk)",
                 "sbatch": "run this on a SLURM login node",
                 "git": "install git"}


class LaunchError(Exception):
    """A command that could not run or failed; the message names it."""


class Shell:
    """Runs commands, or prints them (``dry_run``) exactly as they would run."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def comment(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def require(self, program: str) -> None:
        """Stops with the install hint now if ``program`` is not on PATH (a real run only),
        rather than after the steps before its first use (e.g. minutes of pre-flight)."""
        if not self.dry_run and shutil.which(program) is None:
            hint = INSTALL_HINTS.get(program, "install it or put it on PATH")
            raise LaunchError(f"{program}: command not found; {hint} (or look at the plan "
                              f"with --dry-run)")

    def run(self, argv: list[str], *, check: bool = True, capture: bool = False) -> str:
        """Runs ``argv`` (no shell); returns its stdout when ``capture``."""
        print(shlex.join(argv), file=self.out, flush=True)
        if self.dry_run:
            return ""
        try:
            result = subprocess.run(argv, check=check, text=True,
                                    stdout=subprocess.PIPE if capture else None)
        except FileNotFoundError as e:
            hint = INSTALL_HINTS.get(argv[0], "install it or put it on PATH")
            raise LaunchError(f"{argv[0]}: command not found; {hint} (or look at the plan "
                              f"with --dry-run)") from e
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"`{shlex.join(argv)[:160]}` failed with exit status "
                              f"{e.returncode} (its output is above)") from e
        return result.stdout or ""


def run_main(main) -> None:
    """Runs a launcher's ``main(argv)``: a `LaunchError` or a file that cannot be written
    is one line on stderr and exit status 1, Ctrl-C is 130."""
    try:
        main(sys.argv[1:])
    except LaunchError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        sys.exit(130)


def at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum`` (the message names the value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be >= {minimum}")
        return value
    return parse


def check_config(path: str, overrides: list[str]) -> str:
    """Loads ``path`` with the ``--config.*`` overrides and checks every value as
    ``python -m scaleattn.main`` will (`scaleattn.config.validate`), before a plan is
    printed or run; `LaunchError` with the one line otherwise. ``path`` is looked up
    here and in the repository (where the job runs). Returns what was checked.
    Without ml_collections on this machine only the file's existence is checked."""
    file, *arg = path.split(":", 1)
    if not os.path.isabs(file) and not os.path.isfile(file):
        file = os.path.join(REPO, file)
    if not os.path.isfile(file):
        raise LaunchError(f"--config={path}: no such file (here or in {REPO}); the recipes "
                          f"are configs/*.py")
    try:
        from absl import flags  # pylint: disable=import-outside-toplevel
        from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
    except ImportError:
        return f"{file} exists (its values are not checked: ml_collections is not installed here)"
    sys.path.insert(0, REPO)
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
    own = [a for a in overrides if a.startswith("--config.")]
    try:
        config_lib.load(":".join([file, *arg]))  # the loader main uses: its one-line errors
    except config_lib.ConfigError as e:
        raise LaunchError(str(e)) from None
    try:
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
        values(["launcher", "--config=" + ":".join([file, *arg]), *own])
        config_lib.validate(values.config)
    except config_lib.ConfigError as e:
        raise LaunchError(f"--config={path}: {e}") from None
    except Exception as e:  # pylint: disable=broad-except  # a bad override
        text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'").split())[:240]
        raise LaunchError(f"--config={path} {' '.join(own)}: cannot be loaded "
                          f"({type(e).__name__}: {text})") from None
    return f"{path} with {len(own)} override(s): every value in range"


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
