"""Stopping a training run cleanly on a signal.

SIGTERM (what Cloud TPU preemption, SLURM and Kubernetes send before they stop a job)
and SIGINT (Ctrl-C) ask the training loop to save a checkpoint at the next step
boundary and stop with `Preempted`; rerunning the same command resumes.
"""

import os
import signal
from typing import Callable

import jax


class Preempted(Exception):
    """The run stopped early on a signal, after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signal_name: str | None):
        super().__init__(f"stopped by {signal_name or 'a preemption notice'} after step "
                         f"{step}; checkpoint saved, rerun the same command to resume")
        self.step = step


class PreemptionFlag:
    """SIGTERM (what Cloud TPU preemption and SLURM send) and SIGINT (Ctrl-C) ask the
    loop to save at the next step boundary and stop (`Preempted`; `scaleattn.main` exits
    with `main.PREEMPTED_EXIT`). A second SIGINT stops the process at once, without
    saving: the callables in ``on_abort`` run (the workdir lock is released), then
    ``exit_now(128 + SIGINT)`` (`os._exit`: no exception is raised into whatever the
    main thread was doing, which could leave a lock of a library held and the process
    hanging at exit).

    One process: Python handlers set ``requested``. Several processes: JAX's
    preemption service (started by `jax.distributed`) catches SIGTERM on whichever
    process gets it and agrees with the others on one step at which all of them save
    (`reached`, called every step); no Python SIGTERM handler is installed then, as it
    would replace the service's, and SIGINT is turned into a SIGTERM to this process.
    The handlers only set flags and write to file descriptor 2 (the main thread may be
    inside a write to ``sys.stderr``, which a second write would break).
    """

    def __init__(self, manager=None, exit_now: Callable[[int], None] = os._exit):
        self.requested = False
        self.signal_name = None
        self.manager = manager
        self.on_abort = []
        self.exit_now = exit_now
        self._previous = {}
        self._interrupts = 0

    def __enter__(self):
        import threading  # pylint: disable=import-outside-toplevel
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
        if self._interrupts > 1:
            os.write(2, b"stopped: interrupted twice (SIGINT): stopped at once, without saving "
                        b"the steps since the last checkpoint\n")
            for cleanup in self.on_abort:
                try:
                    cleanup()
                except Exception:  # pylint: disable=broad-except  # exiting anyway
                    pass
            self.exit_now(128 + signal.SIGINT)
            return
        self.signal_name = self.signal_name or name
        again = " (press Ctrl-C again to stop at once, without saving)"
        os.write(2, f"{name} received: saving a checkpoint at the next step boundary, then "
                    f"stopping{again if signum == signal.SIGINT else ''}.\n".encode())
        if jax.process_count() > 1:  # the preemption service agrees on the step
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (every process calls this each step)."""
        if jax.process_count() > 1 and self.manager is not None:
            self.requested = self.requested or self.manager.reached_preemption(step)
        return self.requested

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
