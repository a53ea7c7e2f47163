"""One dataset build at a time per data dir: ``<data_dir>/.<name>.build.lock``.

Two first runs on a fresh ``data.data_dir`` would otherwise both find the dataset
missing and build it into the same folder at once. `held` takes an exclusive
``flock`` on the lock file (the kernel drops it when the process ends, so a killed
build leaves no stale lock); the second process waits, then finds the dataset built.
Standard library only; URLs (``gs://``) are not locked (no shared file locks there).
"""

import contextlib
import fcntl
import logging
import os


@contextlib.contextmanager
def held(data_dir: str, name: str):
    """Holds the build lock of dataset ``name`` in ``data_dir`` (created if needed)."""
    if "://" in str(data_dir):
        yield
        return
    data_dir = os.path.expanduser(str(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f".{name}.build.lock")
    with open(path, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("Waiting for another process that builds %s in %s ...", name, data_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
