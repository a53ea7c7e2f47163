"""Writing results without leaving anything half-written, and one-line errors for
output places that cannot be written (a folder where a file is expected, a file
where a folder is expected, a read-only place).

* `check_file` / `check_dir`: before a tool does its work, the output place is
  checked by writing (and removing) a probe file there, the test that also holds for
  root and for read-only mounts; `OutputError` names the place and the fix.
* `atomic_write`: a file is written under a temporary name in its folder, then
  renamed over the target; on any failure the temporary file is removed, so a reader
  sees the old file or the new one, never part of one.

Standard library only (the data modules and tools without JAX use it).
"""

import contextlib
import os
import tempfile
from typing import Callable


def error_line(error: BaseException, *, with_type: bool = False,
               cut_at: str | None = None, limit: int = 300) -> str:
    """An exception's message on one line: whitespace collapsed, KeyError's quotes
    dropped, cut before ``cut_at`` (where a library starts dumping internals) and at
    ``limit`` characters; ``with_type`` puts the exception's class name first."""
    text = str(error.args[0] if len(error.args) == 1 else error).strip("'\"")
    if cut_at:
        text = text.split(cut_at)[0]
    text = " ".join(text.split())
    if not text:
        return type(error).__name__
    return (f"{type(error).__name__}: {text}" if with_type else text)[:limit]


class OutputError(Exception):
    """An output place that cannot be written; the message names it and the fix."""


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _probe(folder: str, what: str) -> None:
    """Creates and removes a file in ``folder``; `OutputError` if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {folder} ({_reason(e)}); choose a "
                          f"writable place") from e
    os.close(fd)
    os.unlink(probe)


def check_file(path: str, what: str, *, missing_folder_ok: bool = False) -> str:
    """Checks that file ``path`` can be written (it is not a folder; its folder exists,
    or with ``missing_folder_ok`` can be created, and is writable); returns it,
    absolute. ``what`` names it, e.g. '--output'."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise OutputError(f"{what}={path} is a folder; give a file name")
    folder = os.path.dirname(path)
    if missing_folder_ok and not os.path.exists(folder):
        check_dir(folder, what)
        return path
    if not os.path.isdir(folder):
        raise OutputError(f"{what}={path}: folder {folder} does not exist"
                          + ("" if not os.path.exists(folder) else " (it is a file)")
                          + "; create it or choose another place")
    _probe(folder, f"{what}={path}")
    return path


def check_dir(path: str, what: str) -> str:
    """Checks that folder ``path`` exists or can be created and is writable, without
    creating it; returns it, absolute."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{what}={path} is a file, not a folder; give a folder")
    existing = path
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if os.path.exists(existing) or parent == existing:
            raise OutputError(f"{what}={path}: {existing} is a file, not a folder; "
                              f"choose another place")
        existing = parent
    _probe(existing, f"{what}={path}")
    return path


# What a training run owns in its workdir: no tool writes there.
RUN_RECORDS = ("run.json", "train.lock")
RUN_FOLDERS = ("checkpoints", "checkpoints_unreadable")


def _same(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name the same file or folder (links followed)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_not_over(path: str, what: str, *, inputs=(), workdirs=(),
                   folder: bool = False) -> str:
    """Refuses (`OutputError`, one line) an output that would destroy what a tool reads
    or what a training run owns; returns ``path``.

    ``path`` may not be any of ``inputs`` (files or folders the tool reads), nor a
    run record (``run.json``, ``train.lock``) of, nor anything inside the checkpoint
    folders of, any of ``workdirs``. A ``folder`` output may moreover not hold an
    input (its outputs would become the next run's inputs). URLs are not checked.
    """
    if "://" in path:
        return path
    path = os.path.abspath(os.path.expanduser(path))
    for item in inputs:
        if not item or "://" in str(item):
            continue
        item = os.path.abspath(os.path.expanduser(str(item)))
        if _same(path, item):
            raise OutputError(f"{what}={path} is also an input: writing it would destroy "
                              f"what is read; choose another place")
        if folder and _inside(item, path):
            raise OutputError(f"{what}={path} holds the input {item}: the outputs would be "
                              f"read as inputs next time; choose a folder without inputs")
    for workdir in workdirs:
        if not workdir or "://" in str(workdir):
            continue
        workdir = os.path.abspath(os.path.expanduser(str(workdir)))
        for name in RUN_RECORDS:
            if _same(path, os.path.join(workdir, name)):
                raise OutputError(f"{what}={path} is the run's own {name}; choose another "
                                  f"file name")
        for name in RUN_FOLDERS:
            if _inside(path, os.path.join(workdir, name)):
                raise OutputError(f"{what}={path} is inside {os.path.join(workdir, name)}, "
                                  f"which the training run owns; choose a place outside it")
    return path


def make_dir(path: str, what: str) -> str:
    """Creates folder ``path`` (and its parents); `OutputError` naming it if it cannot."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what}={path}: cannot create the folder ({_reason(e)}); "
                          f"choose a writable place") from e
    return path


def atomic_write(path: str, data: bytes | str | Callable) -> str:
    """Writes ``data`` (bytes, text, or a function given the open binary file) to
    ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
