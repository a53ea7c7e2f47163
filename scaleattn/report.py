"""A Markdown table of finished runs (their ``run.json``, `scaleattn.records`).

The digest column says at a glance whether runs reproduced bit for bit.
``python -m scaleattn.report WORKDIR...`` prints the table, and one row per group of
runs that differ only in their seed (mean ± std), each next to the published number
for the same split, CRF / MS-COCO setting and model (`PAPER`; ``--paper`` lists them);
``--json FILE`` writes the seed groups as data (`seed_summary`) for tables rendered
elsewhere (``benchmarks/demo_tables.py``).
"""

import argparse
import json
import os
import sys

import numpy as np

from scaleattn import identity, outputs
from scaleattn.records import load_run, run_path

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


def same_but_seed(a: dict, b: dict) -> bool:
    """Whether two records are runs of one setting: same steps and the same value for
    every config key both have that defines the setting (`identity.defines_setting`:
    the model and the recipe, not the draw or the execution). A key only one record has
    was added to the schema after the other run; its default keeps the earlier
    behaviour."""
    return a.get("steps") == b.get("steps") and not identity.differences(
        a.get("config", {}), b.get("config", {}), identity.defines_setting)


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


def group_labels(groups: list[list[dict]]) -> list[str]:
    """A label per group: its run name, followed where several groups share the name by
    the keys (and values) that tell them apart, e.g. ``demo (optim.base_lr=0.02)``."""
    labels = []
    for group in groups:
        name = group[0].get("name", "—")
        twins = [g[0] for g in groups if g[0].get("name", "—") == name]
        if len(twins) == 1:
            labels.append(name)
            continue
        flats = [dict(identity.flat_config(r.get("config", {})), steps=r.get("steps"))
                 for r in twins]
        mine = dict(identity.flat_config(group[0].get("config", {})),
                    steps=group[0].get("steps"))
        keys = sorted(k for k in set().union(*flats)
                      if (k == "steps" or identity.defines_setting(k))
                      and len({repr(f.get(k)) for f in flats}) > 1)
        labels.append(f"{name} ({', '.join(f'{k}={mine.get(k)}' for k in keys)})")
    return labels


def check_distinct(records: list[dict]) -> None:
    """ValueError naming the second copy if a run is given twice: the same workdir, or
    two workdirs holding the same record (a copied run would count twice in a mean)."""
    seen = {}
    for r in records:
        keys = {"folder": os.path.realpath(str(r.get("workdir", "")))}
        if r.get("params_sha256") is not None:
            keys["record: parameters, date and seed"] = (
                r.get("params_sha256"), r.get("date"), r.get("name"), r.get("seed"))
        for what, key in keys.items():
            if (what, key) in seen:
                raise ValueError(f"{r.get('workdir')} is the same run as {seen[what, key]} "
                                 f"(the same {what}); give each run once, or its mean over "
                                 f"seeds would count it twice")
            seen[what, key] = r.get("workdir")


def mean_std(values: list) -> str:
    """'mean ± std' in % over the runs that have the value (sample std, n - 1)."""
    values = [100 * float(v) for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def version_differences(group: list[dict]) -> dict[str, list[str]]:
    """``{package: [its versions]}`` for the recorded library versions that differ
    within ``group`` (records written before versions were recorded count as unknown)."""
    if all("versions" not in r for r in group):
        return {}
    tables = [r.get("versions") or {} for r in group]
    names = sorted(set().union(*tables))
    return {name: [t.get(name, "unknown") for t in tables] for name in names
            if len({t.get(name, "unknown") for t in tables}) > 1}


def seed_table(records: list[dict]) -> str:
    """One row per group of `seed_groups`: mIoU (and per-class IoU) mean ± std over seeds;
    below the table, the groups whose runs used different library versions."""
    header = ("| config | seeds | steps | mIoU | per-class IoU | mIoU ms+flip | paper mIoU "
              "| paper setting |")
    lines, notes = [header, "|" + "---|" * (header.count("|") - 1)], []
    groups = seed_groups(records)
    for group, label in zip(groups, group_labels(groups)):
        differing = version_differences(group)
        if differing:
            notes.append(f"- {label}: its runs used different library "
                         "versions (" + "; ".join(f"{name} {', '.join(versions)}"
                                                  for name, versions in differing.items())
                         + "), which can move the scores")
        per_class = [r.get("per_class_iou") for r in group]
        classes = ("—" if any(p is None for p in per_class) else " / ".join(
            mean_std(list(column)) for column in zip(*per_class)))
        lines.append("| " + " | ".join([
            label, ", ".join(str(r.get("seed", "?")) for r in group),
            str(group[0].get("steps", "—")), mean_std([r.get("miou") for r in group]),
            classes, mean_std([r.get("miou_ms_flip") for r in group]),
            *paper_cells(group[0])]) + " |")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def seed_summary(records: list[dict]) -> dict:
    """The groups of `seed_groups` as JSON-able data (``--json``): per group its name,
    model setting, and per run the seed, mIoU, per-class IoU (fractions), wall time,
    commit and library versions, so that a table can be rendered from the file alone."""
    groups = []
    for group in seed_groups(records):
        cfg = identity.flat_config(group[0].get("config", {}))
        groups.append({
            "name": group[0].get("name"),
            "steps": group[0].get("steps"),
            "setting": {key: cfg.get(key) for key in (
                "data.name", "model.backbone", "model.head", "model.scales", "model.merge",
                "model.gsag_variant", "loss.type", "loss.extra_supervision")},
            "runs": [{"workdir": os.path.basename(os.path.normpath(r.get("workdir", ""))),
                      "seed": r.get("seed"), "miou": r.get("miou"),
                      "per_class_iou": r.get("per_class_iou"),
                      "wall_time_s": r.get("wall_time_s"), "commit": r.get("commit"),
                      "device": r.get("device"), "versions": r.get("versions")}
                     for r in group]})
    return {"groups": groups}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scaleattn.report",
        description="Markdown tables of training runs (their workdir/run.json): one row "
                    "per run, then one row per group of runs that differ only in the seed "
                    "(mean ± std), each next to the published number for its setting.")
    parser.add_argument("workdirs", nargs="*", metavar="WORKDIR")
    parser.add_argument("--output", help="also write the tables to this file")
    parser.add_argument("--json", help="also write the runs grouped over seeds "
                        "(`seed_summary`) to this JSON file")
    parser.add_argument("--paper", action="store_true",
                        help="print the sourced published numbers (split, CRF, MS-COCO)")
    args = parser.parse_args(argv)
    if not args.workdirs and not args.paper:
        parser.error("give at least one WORKDIR (or --paper)")
    try:
        output = outputs.check_file(args.output, "--output") if args.output else None
        json_output = outputs.check_file(args.json, "--json") if args.json else None
        for flag, path in (("--output", output), ("--json", json_output)):
            if path:
                outputs.check_not_over(path, flag, workdirs=args.workdirs,
                                       inputs=[str(run_path(w)) for w in args.workdirs])
        records = [load_run(w) for w in args.workdirs]
        check_distinct(records)
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
    for flag, path, text in (("--output", output, table), ("--json", json_output, json.dumps(
            seed_summary(records), indent=1) + "\n" if json_output else "")):
        if not path:
            continue
        try:
            outputs.atomic_write(path, text)
        except OSError as e:
            print(f"error: {flag}={path}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
