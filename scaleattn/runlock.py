"""One training run per workdir: ``WORKDIR/train.lock``.

A training run holds the lock from before it touches the workdir until it exits (on
success, error, preemption or Ctrl-C alike). The file is JSON: ``host``, ``pid``,
``started`` (UTC), ``boot_id`` (Linux: tells a pid of an earlier boot), ``job_id``
(``SLURM_JOB_ID`` or ``SCALEATTN_JOB_ID``, when set) and the command. It is created
atomically: written under a temporary name, then hard-linked to ``train.lock``, which
fails if the name exists (local disks and NFS alike).

A second training run that finds the lock stops with `WorkdirLocked`, naming the
holder, unless the lock is stale:

* same host and the pid is not running (or the machine rebooted since): the run that
  held it died without releasing it; the lock is taken over with a warning;
* another host but the same job id (a SLURM job requeued onto other nodes, a TPU run
  restarted by its launcher): taken over with a warning;
* another host otherwise: respected (its pid cannot be checked from here); the
  message says which file to delete if that run is gone.

Multi-host runs: only process 0 takes the lock; the other processes of the same job
are part of the run it holds. Read-only modes (eval, predict, analyze) never take it
and may run beside a training run. On object stores (``gs://`` workdirs) there is no
atomic create: the check and the write are a best effort there.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid

from absl import logging
from etils import epath

LOCK_FILE = "train.lock"
JOB_ID_VARIABLES = ("SCALEATTN_JOB_ID", "SLURM_JOB_ID")


class WorkdirLocked(RuntimeError):
    """Another training run holds the workdir."""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def job_id() -> str:
    return next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v)), "")


def holder_info() -> dict:
    """What this process writes into the lock."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "boot_id": boot_id(), "job_id": job_id(), "token": uuid.uuid4().hex,
            "command": " ".join(sys.argv)[:500]}


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}" + (f", job {holder['job_id']}" if holder.get("job_id")
                                          else ""))


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why ``holder``'s lock may be taken over by ``me``, or ``None`` if it is live."""
    if holder.get("host") == me["host"]:
        if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
            return "its machine has rebooted since"
        if not pid_running(int(holder.get("pid", -1))):
            return "its process is not running"
        return None
    if holder.get("job_id") and holder["job_id"] == me["job_id"]:
        return f"it belongs to this job ({me['job_id']}), restarted on another host"
    return None


class RunLock:
    """The lock of one workdir (see the module docstring); `acquire`, then `release`."""

    def __init__(self, workdir: str):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.info = None
        self.created_workdir = False

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or damaged
        return holder if isinstance(holder, dict) else {}

    def _create(self, text: str) -> bool:
        """Writes the lock if there is none; whether it did."""
        if "://" in str(self.path):  # object store: no atomic create-if-absent
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        tmp = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)  # fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def acquire(self) -> None:
        """Takes the lock, or raises `WorkdirLocked` naming its holder."""
        if not self.workdir.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.created_workdir = True
        me = holder_info()
        for _ in range(5):
            if self._create(json.dumps(me, indent=1)):
                self.info = me
                return
            holder = self._read()
            if holder is None:  # released in between: try again
                continue
            if not holder:
                raise WorkdirLocked(
                    f"{self.workdir} has a lock file {self.path} that cannot be read (a run "
                    f"is starting, or it is damaged). If no training run uses this workdir, "
                    f"delete {self.path}.")
            reason = stale_reason(holder, me)
            if reason is None:
                fix = ("wait for it to end, stop it, or use another --workdir"
                       if holder.get("host") == me["host"] else
                       f"wait for it to end or use another --workdir; if that run is gone, "
                       f"delete {self.path}")
                raise WorkdirLocked(f"{self.workdir} is in use by another training run "
                                    f"({describe(holder)}): {fix}.")
            logging.warning("Taking over the lock of %s from %s: %s.", self.workdir,
                            describe(holder), reason)
            if self._read() == holder:  # unchanged since it was judged stale
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        raise WorkdirLocked(f"cannot take the lock {self.path}: other runs keep taking it; "
                            f"use another --workdir.")

    def release(self) -> None:
        """Deletes the lock if it is still ours; removes the workdir if `acquire` created
        it and nothing else was written there."""
        if self.info is None:
            return
        holder = self._read()
        if holder and holder.get("token") == self.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.info = None
        if self.created_workdir:
            with contextlib.suppress(OSError):
                if not any(self.workdir.iterdir()):
                    self.workdir.rmdir()


@contextlib.contextmanager
def hold(workdir: str, *, take: bool = True):
    """Holds the workdir's lock for the ``with`` block (``take=False``: nothing, e.g.
    processes other than 0 of a multi-host run)."""
    lock = RunLock(workdir) if take else None
    if lock is not None:
        lock.acquire()
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def hold_for_run(workdir: str):
    """`hold` for a training run of one or several processes: process 0 takes the lock
    and every process learns whether it got it (a `WorkdirLocked` on all of them if
    not)."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
        return hold(workdir)

    @contextlib.contextmanager
    def held():
        import numpy as np  # pylint: disable=import-outside-toplevel
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        lock, error = None, None
        if jax.process_index() == 0:
            lock = RunLock(workdir)
            try:
                lock.acquire()
            except WorkdirLocked as e:
                error = e
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if error is not None:
            raise error
        if not ok:
            raise WorkdirLocked(f"{workdir} is in use by another training run "
                                f"(process 0 names it)")
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()
    return held()
