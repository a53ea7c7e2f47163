"""Reproducibility records: ``workdir/run.json`` and a Markdown table of runs.

A finished training run leaves ``run.json`` in its workdir (`finish_run`, called at
the end of `train.train_and_evaluate`): the config and its name, the git commit of
the code, the steps, the final scores (single-scale and, if asked for, multi-scale +
flip), the wall time, the device, and a SHA-256 digest of the trained parameters.
Two runs with the same seed and config on CPU give the same scores and the same
digest (tested), so the digest column of the table says at a glance whether runs
reproduced bit for bit.

``python -m scaleattn.report WORKDIR...`` prints the table, and one row per group of
runs that differ only in their seed (mean ± std), each next to the published number
for the same split, CRF / MS-COCO setting and model (`PAPER`; ``--paper`` lists them).
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

from scaleattn import checkpoint, outputs

RUN_FILE = "run.json"

# Published VOC 2012 numbers we could source, each with its split, CRF and MS-COCO
# setting. A run is compared only with the rows whose `match` equals its `setting`
# on every key (split, CRF and COCO included); rows with ``match=None`` are listed
# for reference (`--paper`) but describe a setup this code does not train (another
# dataset, a domain transform, a classifier head we do not have). ``coco=None``: the
# source does not establish whether MS-COCO was used.
VOC_VGG = {"data": "voc2012", "backbone": "vgg16", "head": "largefov"}
PAPER = (
    {"what": "DeepLab-LargeFOV, step policy, batch 30, 6K iterations (the attention "
             "paper's baseline schedule)", "split": "val", "crf": False, "coco": False,
     "miou": 62.25, "source": "DeepLab-v2 paper, Table 2",
     "match": dict(VOC_VGG, num_scales=1, schedule="step")},
    {"what": "DeepLab-LargeFOV, poly policy", "split": "val", "crf": False, "coco": False,
     "miou": 63.42, "source": "DeepLab-v2 paper, Table 2",
     "match": dict(VOC_VGG, num_scales=1, schedule="poly")},
    {"what": "DeepLab-LargeFOV (v1) + CRF", "split": "val", "crf": True, "coco": False,
     "miou": 67.64, "source": "DeepLab v1 paper",
     "match": dict(VOC_VGG, num_scales=1)},
    {"what": "DeepLab-CRF-Attention (the Attention-to-Scale entry)", "split": "test",
     "crf": True, "coco": None, "miou": 75.7, "source": "DeepLab-v2 paper, Table 5",
     "match": dict(VOC_VGG, num_scales=3, merge="attention", extra_supervision=True)},
    {"what": "DeepLab-CRF-Attention-DT (adds a domain transform, another paper)",
     "split": "test", "crf": True, "coco": None, "miou": 76.3,
     "source": "DeepLab-v2 paper, Table 5", "match": None},
    {"what": "DeepLab-v2 ResNet-101, plain classifier, single scale", "split": "val",
     "crf": False, "coco": False, "miou": 68.72, "source": "DeepLab-v2 paper, Table 4",
     "match": None},
    {"what": "DeepLab-v2 ResNet-101 + multi-scale inputs (max fusion)", "split": "val",
     "crf": False, "coco": False, "miou": 71.27, "source": "DeepLab-v2 paper, Table 4",
     "match": None},
    {"what": "DeepLab-v2 ResNet-101 + MSC + COCO", "split": "val", "crf": False,
     "coco": True, "miou": 73.28, "source": "DeepLab-v2 paper, Table 4", "match": None},
    {"what": "DeepLab-v2 ResNet-101 + MSC + COCO + Aug", "split": "val", "crf": False,
     "coco": True, "miou": 74.87, "source": "DeepLab-v2 paper, Table 4", "match": None},
    {"what": "DeepLab-v2 ResNet-101 + MSC + COCO + Aug + LargeFOV", "split": "val",
     "crf": False, "coco": True, "miou": 75.54, "source": "DeepLab-v2 paper, Table 4",
     "match": None},
    {"what": "DeepLab-v2 ResNet-101 + MSC + COCO + Aug + ASPP", "split": "val", "crf": False,
     "coco": True, "miou": 76.35, "source": "DeepLab-v2 paper, Table 4",
     "match": {"data": "voc2012", "backbone": "resnet101", "head": "aspp_v2", "num_scales": 3,
               "merge": "max"}},
    {"what": "DeepLab-v2 ResNet-101 + MSC + COCO + Aug + ASPP + CRF", "split": "val",
     "crf": True, "coco": True, "miou": 77.69, "source": "DeepLab-v2 paper, Table 4",
     "match": {"data": "voc2012", "backbone": "resnet101", "head": "aspp_v2", "num_scales": 3,
               "merge": "max"}},
    {"what": "DeepLab-Attention (VGG16, multi-scale), PASCAL-Person-Part", "split": "val",
     "crf": None, "coco": None, "miou": 56.39, "source": "DeepLab-v2 paper, Table 7",
     "match": None},
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


def setting(record: dict) -> dict:
    """What a run is compared on: the `PAPER` match keys plus split, CRF and COCO.

    Our runs never pretrain on MS-COCO (``coco`` False); ``crf`` is True only when the
    record says a CRF was applied to the scores it reports.
    """
    cfg = record.get("config", {})
    model, loss = cfg.get("model", {}), cfg.get("loss", {})
    crf = record.get("crf")
    return {"data": cfg.get("data", {}).get("name"),
            "split": cfg.get("data", {}).get("eval_split"),
            "crf": bool(crf.get("applied")) if isinstance(crf, dict) else False,
            "coco": False,
            "backbone": model.get("backbone"), "head": model.get("head"),
            "num_scales": len(model.get("scales", ())), "merge": model.get("merge"),
            "extra_supervision": loss.get("extra_supervision"),
            "schedule": cfg.get("optim", {}).get("schedule")}


def paper_reference(record: dict) -> dict | None:
    """The `PAPER` row with the run's split, CRF, COCO and model setting, or ``None``.

    A row whose MS-COCO use is not established (``coco=None``) is not ruled out by
    the run's COCO setting; its cell says so.
    """
    keys = setting(record)
    for row in PAPER:
        if row["match"] is None or any(keys[k] != row[k] for k in ("split", "crf")):
            continue
        if row["coco"] is not None and row["coco"] != keys["coco"]:
            continue
        if all(keys.get(k) == v for k, v in row["match"].items()):
            return row
    return None


def paper_table() -> str:
    """The sourced published numbers, as a Markdown table."""
    flag = {True: "yes", False: "no", None: "not established"}
    lines = ["| what | split | CRF | MS-COCO | mIoU | source |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['split']} | {flag[r['crf']]} | {flag[r['coco']]} | "
              f"{r['miou']:.2f} | {r['source']} |" for r in PAPER]
    return "\n".join(lines) + "\n"


def percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def reference(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def paper_cells(record: dict) -> list[str]:
    """The 'paper mIoU' and 'paper setting' cells of a run's row."""
    paper = paper_reference(record)
    if paper is None:
        return ["—", "no published number for this split / CRF / model setting"]
    coco = {True: "MS-COCO yes", False: "MS-COCO no", None: "MS-COCO not established"}
    return [f"{paper['miou']:.2f}", f"{paper['what']} ({paper['split']}, "
            f"CRF {'yes' if paper['crf'] else 'no'}, {coco[paper['coco']]}; "
            f"{paper['source']})"]


def markdown_table(records: list[dict]) -> str:
    """One row per run: identity, scores (in %), time, device, and the paper's number."""
    header = ("| run | config | commit | seed | steps | mIoU | mIoU ms+flip | wall time | "
              "device | params sha256 | paper mIoU | paper setting |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        wall = r.get("wall_time_s")
        lines.append("| " + " | ".join([
            os.path.basename(os.path.normpath(r.get("workdir", ""))) or "—",
            r.get("name", "—"), f"`{r.get('commit', '—')}`", str(r.get("seed", "—")),
            str(r.get("steps", "—")),
            percent(r.get("miou")), percent(r.get("miou_ms_flip")),
            "—" if wall is None else f"{wall / 60:.1f} min", r.get("device", "—"),
            f"`{r.get('params_sha256', '')[:12]}`" if r.get("params_sha256") else "—",
            *paper_cells(r),
        ]) + " |")
    return "\n".join(lines) + "\n"


def flat_config(record: dict) -> dict:
    """A record's config as ``{'section.key': value}``."""
    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(walk(record.get("config", {}), ""))


def same_but_seed(a: dict, b: dict) -> bool:
    """Whether two records are runs of one setting: same steps and the same value for
    every config key both have, the seed aside. A key only one record has was added to
    the schema after the other run; its default keeps the earlier behaviour."""
    ca, cb = flat_config(a), flat_config(b)
    return a.get("steps") == b.get("steps") and all(
        ca[k] == cb[k] for k in ca.keys() & cb.keys() if k != "seed")


def seed_groups(records: list[dict]) -> list[list[dict]]:
    """Runs grouped by `same_but_seed` with the group's first run, in order of appearance."""
    groups: list[list[dict]] = []
    for r in records:
        group = next((g for g in groups if same_but_seed(g[0], r)), None)
        if group is None:
            groups.append([r])
        else:
            group.append(r)
    return groups


def mean_std(values: list) -> str:
    """'mean ± std' in % over the runs that have the value (sample std, n - 1)."""
    values = [100 * float(v) for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def seed_table(records: list[dict]) -> str:
    """One row per group of `seed_groups`: mIoU (and per-class IoU) mean ± std over seeds."""
    header = ("| config | seeds | steps | mIoU | per-class IoU | mIoU ms+flip | paper mIoU "
              "| paper setting |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for group in seed_groups(records):
        per_class = [r.get("per_class_iou") for r in group]
        classes = ("—" if any(p is None for p in per_class) else " / ".join(
            mean_std(list(column)) for column in zip(*per_class)))
        lines.append("| " + " | ".join([
            group[0].get("name", "—"), ", ".join(str(r.get("seed", "?")) for r in group),
            str(group[0].get("steps", "—")), mean_std([r.get("miou") for r in group]),
            classes, mean_std([r.get("miou_ms_flip") for r in group]),
            *paper_cells(group[0])]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scaleattn.report",
        description="Markdown tables of training runs (their workdir/run.json): one row "
                    "per run, then one row per group of runs that differ only in the seed "
                    "(mean ± std), each next to the published number for its setting.")
    parser.add_argument("workdirs", nargs="*", metavar="WORKDIR")
    parser.add_argument("--output", help="also write the tables to this file")
    parser.add_argument("--paper", action="store_true",
                        help="print the sourced published numbers (split, CRF, MS-COCO)")
    args = parser.parse_args(argv)
    if not args.workdirs and not args.paper:
        parser.error("give at least one WORKDIR (or --paper)")
    try:
        output = outputs.check_file(args.output, "--output") if args.output else None
        records = [load_run(w) for w in args.workdirs]
    except (ValueError, outputs.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    parts = []
    if records:
        parts += ["### Runs\n\n" + markdown_table(records),
                  "### Over seeds (mean ± sample std)\n\n" + seed_table(records)]
    if args.paper:
        parts.append("### Published numbers\n\n" + paper_table())
    table = "\n".join(parts)
    print(table, end="")
    if output:
        try:
            outputs.atomic_write(output, table)
        except OSError as e:
            print(f"error: --output={output}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
