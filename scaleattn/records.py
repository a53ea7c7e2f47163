"""Reproducibility records: ``workdir/run.json``, written at the end of training.

A finished training run leaves ``run.json`` in its workdir (`run_record`,
`write_run`; the training loop calls them): the config and its name, the git commit
of the code, the steps, the final scores (single-scale and, if asked for, multi-scale
+ flip), the wall time, the device, the versions of the libraries that can move the
numbers (`package_versions`), and a SHA-256 digest of the trained parameters. Two runs
with the same seed, config and library versions on CPU give the same scores and the
same digest (tested), so a digest says at a glance whether runs reproduced bit for bit;
another JAX, TensorFlow or numpy may change the last bits, and over a training run the
scores.
`load_run` reads a record back, checked (`scaleattn.report` makes tables of them).
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess

import numpy as np
from etils import epath

from scaleattn import checkpoint

RUN_FILE = "run.json"


def tree_digest(tree) -> str:
    """SHA-256 (hex) of a pytree of arrays: paths, dtypes, shapes and bytes, in order.

    Equal digests mean bit-identical trees; any changed bit changes it.
    """
    import jax  # pylint: disable=import-outside-toplevel
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def git_commit(path: str | None = None) -> str:
    """HEAD of the repository holding ``path`` (this package), ``-dirty`` if edited.

    ``'unknown'`` outside a git checkout.
    """
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


# The installed distributions whose versions can change a run's numbers: XLA's code
# (jax, jaxlib), the model, optimiser and checkpoint libraries, the input pipeline and
# the demo data generator (tensorflow, tensorflow-datasets, numpy, Pillow, scipy).
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                     "ml_dtypes", "tensorflow", "tensorflow-cpu", "tensorflow-datasets",
                     "pillow", "scipy")


def package_versions() -> dict[str, str]:
    """``{'python': ..., distribution: version}`` for the installed `RECORDED_PACKAGES`
    (read from the installed metadata, nothing imported; absent ones left out)."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def device_description() -> str:
    """E.g. ``'cpu x1 (2 cores)'`` or ``'NVIDIA H100 80GB HBM3 x8'``."""
    import jax  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
    text = f"{device.device_kind} x{jax.device_count()}"
    if device.platform == "cpu":
        text += f" ({os.cpu_count()} cores)"
    return text


def run_record(config, *, steps: int, scores: dict, ms_flip_scores: dict | None,
               wall_time_s: float, params, start: str | None = None,
               resumed_at: int | None = None) -> dict:
    """The JSON-able record of a finished run (see the module docstring).

    ``start`` is where the run's first step started from: 'scratch' or the path of
    the converted ImageNet file, as the checkpoints recorded it on a resumed run
    (``None``: not known); ``resumed_at``: the step this process resumed from
    (``None``: it trained from the start).
    """
    from scaleattn import crf  # pylint: disable=import-outside-toplevel

    def score(values, key):
        value = (values or {}).get(key)
        return None if value is None else float(value)

    return {
        "name": config.name,
        "commit": git_commit(),
        "steps": int(steps),
        "seed": int(config.seed),
        "start": start,
        "resumed_at_step": resumed_at,
        "miou": score(scores, "miou"),
        "pixel_accuracy": score(scores, "pixel_accuracy"),
        "per_class_iou": None if not scores or scores.get("per_class_iou") is None else
        [None if np.isnan(v) else float(v) for v in np.asarray(scores["per_class_iou"])],
        "miou_ms_flip": score(ms_flip_scores, "miou"),
        # With eval.crf the scores above are after the dense CRF; these are without it.
        "crf": {"applied": bool(config.eval.crf), **(
            crf.CRFParams.from_config(config.crf).as_dict() if config.eval.crf else {})},
        "miou_no_crf": score((scores or {}).get("no_crf"), "miou"),
        "miou_ms_flip_no_crf": score((ms_flip_scores or {}).get("no_crf"), "miou"),
        "wall_time_s": round(float(wall_time_s), 1),
        "device": device_description(),
        "versions": package_versions(),
        "params_sha256": tree_digest(params),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": json.loads(config.to_json()),
    }


def run_path(workdir: str) -> epath.Path:
    """``workdir/run.json``; a local path or a bucket URL (``gs://...``) alike."""
    return epath.Path(checkpoint.resolve_workdir(workdir)) / RUN_FILE


def write_run(workdir: str, record: dict) -> str:
    """Writes ``workdir/run.json`` (atomically: a temporary file, then a rename) and
    returns its path. ``workdir`` may be a bucket URL (``gs://...``)."""
    path = run_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return str(path)


def load_run(workdir: str) -> dict:
    """The record in ``workdir/run.json`` plus ``workdir``; ValueError if absent."""
    path = run_path(workdir)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {workdir} the workdir of a finished "
                         f"training run?")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    check_record(record, str(path))
    return dict(record, workdir=workdir)


# The fields of a run record the tables read: name -> (accepted JSON types, required).
# Numbers are never booleans; scores are fractions in 0..1.
RECORD_FIELDS = {
    "name": ((str,), True), "steps": ((int,), True), "config": ((dict,), True),
    "miou": ((float, int, type(None)), True), "commit": ((str,), False),
    "seed": ((int,), False), "pixel_accuracy": ((float, int, type(None)), False),
    "miou_ms_flip": ((float, int, type(None)), False),
    "wall_time_s": ((float, int, type(None)), False), "device": ((str,), False),
    "params_sha256": ((str,), False), "start": ((str, type(None)), False),
    "resumed_at_step": ((int, type(None)), False),
    "versions": ((dict,), False),
}
SCORE_FIELDS = ("miou", "pixel_accuracy", "miou_ms_flip")
TYPE_NAMES = {str: "text", int: "an integer", float: "a number", dict: "an object",
              type(None): "null"}


def check_record(record, path: str) -> None:
    """Raises ValueError naming ``path`` and the field unless ``record`` is a run record."""
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}, not a run record (the "
                         f"object a finished training writes); rerun the training or delete it")
    missing = [k for k, (_, required) in RECORD_FIELDS.items() if required and k not in record]
    if missing:
        raise ValueError(f"{path} is not a complete run record: it lacks "
                         f"{', '.join(map(repr, missing))}; rerun the training or delete it")
    for key, (types, _) in RECORD_FIELDS.items():
        value = record.get(key)
        if key in record and (not isinstance(value, types) or isinstance(value, bool)):
            names = " or ".join(TYPE_NAMES[t] for t in types  # int counts as a number
                                if not (t is int and float in types))
            raise ValueError(f"{path}: field {key!r} is {json.dumps(value)[:60]}, expected "
                             f"{names}; rerun the training or fix the file")
        if key in SCORE_FIELDS and value is not None and not 0 <= value <= 1:
            raise ValueError(f"{path}: field {key!r} is {value}, expected a fraction in 0..1")
