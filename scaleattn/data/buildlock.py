"""One dataset build at a time per data dir: ``<data_dir>/.<name>.build.lock``.

Two first runs on a fresh ``data.data_dir`` would otherwise both find the dataset
missing and build it into the same folder at once. `held` takes an exclusive
``flock`` on the lock file (the kernel drops it when the process ends, so a killed
build leaves no stale lock); the second process waits, then finds the dataset built.
The holder removes the file before it unlocks; a waiter that then holds a removed
file opens the lock again.
A failed build in a folder it created removes the folder again (nothing is left).
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
    created = not os.path.exists(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f".{name}.build.lock")
    lock = _acquire(path, f"{name} in {data_dir}")
    try:
        yield
    except BaseException:
        if created:  # a failed first build leaves no folder behind
            _release(lock, path)
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)
        raise
    finally:
        _release(lock, path)


def _acquire(path: str, what: str):
    """The open lock file at ``path``, locked (waits for the holder). A file the holder
    removed meanwhile is not the lock any more: opened again."""
    while True:
        lock = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("Waiting for another process that builds %s ...", what)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()


def _release(lock, path: str) -> None:
    """Removes the lock file (so the dataset folder holds only the dataset), then unlocks."""
    if lock.closed:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    lock.close()  # closing drops the flock
