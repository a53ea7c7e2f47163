"""Reproducibility records: ``workdir/run.json`` and a Markdown table of runs.

A finished training run leaves ``run.json`` in its workdir (`finish_run`, called at
the end of `train.train_and_evaluate`): the config and its name, the git commit of
the code, the steps, the final scores (single-scale and, if asked for, multi-scale +
flip), the wall time, the device, and a SHA-256 digest of the trained parameters.
Two runs with the same seed and config on CPU give the same scores and the same
digest (tested), so the digest column of the table says at a glance whether runs
reproduced bit for bit.

``python -m scaleattn.report WORKDIR...`` prints the table, next to the paper's
numbers for the matching setting (DESIGN.md §1.1) as reference columns.
"""

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
from etils import epath

from scaleattn import checkpoint

RUN_FILE = "run.json"

# The paper's (and later reimplementations') numbers, by setting (DESIGN.md §1.1).
# A run matches a row when every key of `match` equals the run's value.
PAPER = (
    {"match": {"data": "voc2012", "backbone": "vgg16", "num_scales": 1},
     "val": 62.25, "test": None,
     "setting": "DeepLab-LargeFOV single scale (63.42 with poly LR)"},
    {"match": {"data": "voc2012", "backbone": "vgg16", "num_scales": 3,
               "merge": "attention", "extra_supervision": True},
     "val": None, "test": 75.7,
     "setting": "LargeFOV-CRF + attention + extra supervision, VOC test (76.3 with COCO)"},
    {"match": {"data": "voc2012", "backbone": "resnet101", "num_scales": 3,
               "merge": "attention", "extra_supervision": True},
     "val": 77.0, "test": None,
     "setting": "ResNet-101 reimplementations, VOC val (~77)"},
)


# ------------------------------------------------------------------ the record ---


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


def device_description() -> str:
    """E.g. ``'cpu x1 (2 cores)'`` or ``'NVIDIA H100 80GB HBM3 x8'``."""
    import jax  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
    text = f"{device.device_kind} x{jax.device_count()}"
    if device.platform == "cpu":
        text += f" ({os.cpu_count()} cores)"
    return text


def run_record(config, *, steps: int, scores: dict, ms_flip_scores: dict | None,
               wall_time_s: float, params, start: str | None = None) -> dict:
    """The JSON-able record of a finished run (see the module docstring).

    ``start`` is where the run's first step started from: 'scratch' or the path of
    the converted ImageNet file (``None``: not known).
    """
    def score(values, key):
        value = (values or {}).get(key)
        return None if value is None else float(value)

    return {
        "name": config.name,
        "commit": git_commit(),
        "steps": int(steps),
        "seed": int(config.seed),
        "start": start,
        "miou": score(scores, "miou"),
        "pixel_accuracy": score(scores, "pixel_accuracy"),
        "miou_ms_flip": score(ms_flip_scores, "miou"),
        "wall_time_s": round(float(wall_time_s), 1),
        "device": device_description(),
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


def finish_run(config, workdir: str, run, state, scores: dict, *,
               wall_time_s: float, start: str | None = None) -> dict | None:
    """End-of-training hook: ms+flip eval if ``config.predict.ms_eval_at_end``, run.json.

    ``state`` is the (possibly replicated) device state of ``run`` (a `train.Run`).
    Every process takes part in the evaluation; process 0 writes the file. Returns
    the record (``None`` on other processes).
    """
    import jax  # pylint: disable=import-outside-toplevel
    from scaleattn import parallel, predict  # pylint: disable=import-outside-toplevel
    # A collective in the sharded mode: every process takes part.
    host_state = jax.device_get(parallel.unreplicate(state, run.layout or run.mode))
    ms_flip = None
    if config.predict.ms_eval_at_end:
        ms_flip = predict.evaluate_ms_flip(config, run.model, host_state)
    if jax.process_index() != 0:
        return None
    record = run_record(config, steps=int(host_state.step), scores=scores,
                        ms_flip_scores=ms_flip, wall_time_s=wall_time_s,
                        params=host_state.params, start=start)
    write_run(workdir, record)
    return record


# ------------------------------------------------------------------ the table ---


def load_run(workdir: str) -> dict:
    """The record in ``workdir/run.json`` plus ``workdir``; ValueError if absent."""
    path = run_path(workdir)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {workdir} the workdir of a finished "
                         f"training run?")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    return dict(record, workdir=workdir)


def setting(record: dict) -> dict:
    """The keys of a run's config that `PAPER` rows are matched on."""
    cfg = record.get("config", {})
    model, loss = cfg.get("model", {}), cfg.get("loss", {})
    return {"data": cfg.get("data", {}).get("name"), "backbone": model.get("backbone"),
            "num_scales": len(model.get("scales", ())), "merge": model.get("merge"),
            "extra_supervision": loss.get("extra_supervision")}


def paper_reference(record: dict) -> dict | None:
    """The `PAPER` row for a run's setting, or ``None``."""
    keys = setting(record)
    for row in PAPER:
        if all(keys.get(k) == v for k, v in row["match"].items()):
            return row
    return None


def percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def reference(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(records: list[dict]) -> str:
    """One row per run: identity, scores (in %), time, device, and the paper's numbers."""
    header = ("| run | config | commit | steps | mIoU | mIoU ms+flip | wall time | device "
              "| params sha256 | paper val | paper test | paper setting |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        paper = paper_reference(r) or {}
        wall = r.get("wall_time_s")
        lines.append("| " + " | ".join([
            os.path.basename(os.path.normpath(r.get("workdir", ""))) or "—",
            r.get("name", "—"), f"`{r.get('commit', '—')}`", str(r.get("steps", "—")),
            percent(r.get("miou")), percent(r.get("miou_ms_flip")),
            "—" if wall is None else f"{wall / 60:.1f} min", r.get("device", "—"),
            f"`{r.get('params_sha256', '')[:12]}`" if r.get("params_sha256") else "—",
            reference(paper.get("val")), reference(paper.get("test")),
            paper.get("setting", "—"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scaleattn.report",
        description="Markdown table of training runs (their workdir/run.json) next to "
                    "the paper's numbers.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        records = [load_run(w) for w in args.workdirs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = markdown_table(records)
    print(table, end="")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
