"""The demo tables: the merges and the GSAG heads on `scale_shapes`, over seeds.

    python -m benchmarks.demo_tables run --table=merges --root=/tmp/demo_seeds [--seeds=0,1,2]
    python -m scaleattn.report /tmp/demo_seeds/merges/*/ --json=/tmp/demo_seeds/merges.json
    python -m benchmarks.demo_tables render /tmp/demo_seeds/merges.json \
        [--result=benchmarks/results/demo_merges.json --command=... --machine=...]
    python -m benchmarks.demo_tables hier --root=/tmp/demo_seeds \
        [--result=benchmarks/results/demo_hierarchical.json]

``run`` trains every (row, seed) of a table, one after the other, each with
``python -m scaleattn.main`` in ``<root>/<table>/<row>_s<seed>``; a workdir that holds a
finished run (``run.json``) is skipped and one with checkpoints resumes, so the command
can be stopped and started again. Every row is the same recipe (``configs/demo.py``) with
only its merge or head changed (its variants, ``configs/demo.py:max`` ...).

``hier`` evaluates the merges table's hierarchical runs on other scale lists without
retraining (``--mode=eval --output``) and tabulates them beside its own and softmax
attention's final scores (`hier_table`).

``render`` turns the JSON of ``python -m scaleattn.report --json`` (`report.seed_summary`)
into the Markdown table of docs/results.md (`render`); ``--result`` also writes it as a
``benchmarks/results/`` file (`result_file`: columns, rows, commands, commit, library
versions), the form the docs' table generator reads.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# table -> rows: (workdir stem, config file, extra flags, what the row is)
TABLES = {
    "merges": (
        ("single", "configs/demo.py:single", (), "single scale"),
        ("max", "configs/demo.py:max", (), "max over scales"),
        ("avg", "configs/demo.py:avg", (), "average over scales"),
        ("noextra", "configs/demo.py:noextra", (), "attention, no extra supervision"),
        ("attention", "configs/demo.py", (), "attention"),
        ("hier", "configs/demo.py:hier", (), "hierarchical attention"),
    ),
    "gsag": (
        ("basic", "configs/demo.py:gsag_basic", (), "GSAG basic, CE"),
        ("incremental", "configs/demo.py:gsag_incremental", (), "GSAG incremental, CE"),
        ("hybrid", "configs/demo.py:gsag_hybrid", (), "GSAG hybrid, OHEM"),
        ("hybrid_ce", "configs/demo.py:gsag_hybrid",
         ("--config.loss.type=ce", "--config.name=demo_gsag_hybrid_ce"), "GSAG hybrid, CE"),
    ),
}
CLASS_NAMES = ("background", "circle", "square", "triangle")  # scale_shapes' labels


def run_table(table: str, root: str, seeds: list[int], extra: list[str]) -> None:
    """Trains the missing runs of ``table`` under ``root/table`` (see the module doc)."""
    for seed in seeds:
        for stem, config_file, flags, _ in TABLES[table]:
            workdir = os.path.join(root, table, f"{stem}_s{seed}")
            if os.path.isfile(os.path.join(workdir, "run.json")):
                print(f"done already: {workdir}", flush=True)
                continue
            command = [sys.executable, "-m", "scaleattn.main", f"--config={config_file}",
                       f"--workdir={workdir}", f"--config.seed={seed}", *flags, *extra]
            print("running: " + " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)


# The hierarchical table: (label, evaluated on, --config.model.inference_scales or None
# for the run's own final evaluation), the softmax-attention row first.
HIER_ROWS = (
    ("softmax attention (`demo_attention`)", "{1, 0.5}", "attention", None),
    ("hierarchical (`demo_hier`)", "{0.5, 1}", "hier", None),
    ("hierarchical, no retraining", "{0.25, 0.5, 1}", "hier", "(0.25,0.5,1.0)"),
    ("hierarchical, no retraining", "{0.5, 1, 2}", "hier", "(0.5,1.0,2.0)"),
)


def hier_table(root: str, seeds: list[int], extra: list[str]) -> tuple[list, list, list]:
    """The hierarchical merge on its training scales and on other scale lists without
    retraining, beside softmax attention: ``(columns, rows, commands)`` from the merges
    table's runs under ``root/merges`` (`run_table`); the other lists are evaluated with
    ``--mode=eval --output`` into ``root/hier_eval`` (skipped where that file exists)."""
    columns = ["model", "trained on", "evaluated on", "val mIoU (per seed " +
               " / ".join(map(str, seeds)) + ")"]
    rows, commands = [], []
    for label, evaluated_on, stem, scales in HIER_ROWS:
        values = []
        for seed in seeds:
            workdir = os.path.join(root, "merges", f"{stem}_s{seed}")
            if scales is None:
                with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
                    values.append(json.load(f)["miou"])
                continue
            output = os.path.join(root, "hier_eval", f"{stem}_s{seed}_{scales.strip('()')}.json")
            command = [sys.executable, "-m", "scaleattn.main", "--config=configs/demo.py:hier",
                       f"--workdir={workdir}", "--mode=eval", f"--output={output}",
                       f"--config.model.inference_scales={scales}", *extra]
            if not os.path.isfile(output):
                print("running: " + " ".join(command[1:]), flush=True)
                subprocess.run(command, check=True)
            with open(output, encoding="utf-8") as f:
                values.append(json.load(f)["miou"])
        if scales is not None:
            commands.append("python -m scaleattn.main --config=configs/demo.py:hier "
                            f"--workdir={root}/merges/hier_s<seed> --mode=eval "
                            f"--output=... --config.model.inference_scales='{scales}' "
                            + " ".join(extra))
        rows.append([label, "{1, 0.5}", evaluated_on,
                     mean_std(values) + " (" + " / ".join(f"{100 * v:.1f}" for v in values)
                     + ")"])
    return columns, rows, commands


def mean_std(values) -> str:
    """'mean ± sample std' in % (one value: the value)."""
    values = 100 * np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def row_order(group: dict) -> int:
    """A report group's place in its table: the order of `TABLES` (single, max, average,
    no extra supervision, attention, hierarchical; basic, incremental, hybrid, hybrid
    with CE), matched on the end of the config name (``demo_max``); others last."""
    stems = [stem for rows in TABLES.values() for stem, *_ in rows]
    return next((i for i, stem in enumerate(stems) if group["name"].endswith("_" + stem)),
                len(stems))


def columns_and_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The table of a `report.seed_summary` JSON: one row per group, mIoU and each
    class's IoU as mean ± sample std over its seeds (in %), then mIoU per seed."""
    columns = ["config", "scales", "merge / head", "extra supervision", "seeds", "val mIoU",
               *(f"IoU {name}" for name in CLASS_NAMES), "mIoU per seed"]
    rows = []
    for group in sorted(summary["groups"], key=row_order):
        setting, runs = group["setting"], group["runs"]
        gsag = setting.get("model.head") == "gsag"
        head = (f"GSAG {setting['model.gsag_variant']}, {setting['loss.type'].upper()}"
                if gsag else setting["model.merge"])
        scales = setting["model.scales"]
        per_class = np.asarray([r["per_class_iou"] for r in runs], np.float64)
        rows.append([
            f"`{group['name']}`", "{" + ", ".join(f"{s:g}" for s in scales) + "}",
            head if len(scales) > 1 or gsag else "—",
            ("yes" if setting["loss.extra_supervision"] else "no") if len(scales) > 1 else "—",
            ", ".join(str(r["seed"]) for r in runs),
            "**" + mean_std([r["miou"] for r in runs]) + "**",
            *(mean_std(per_class[:, c]) for c in range(per_class.shape[1])),
            " / ".join(f"{100 * r['miou']:.1f}" for r in runs)])
    return columns, rows


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of these columns and rows."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def render(summary: dict) -> str:
    """`columns_and_rows` as a Markdown table."""
    return markdown(*columns_and_rows(summary))


def result_file(summary: dict, command: list[str], machine: str) -> dict:
    """The table as a ``benchmarks/results/<name>.json`` result (columns, rows and where
    they came from: the commands, the runs' commit(s) and library versions)."""
    runs = [r for group in summary["groups"] for r in group["runs"]]
    commits = sorted({r.get("commit") or "unknown" for r in runs})
    versions = next((r["versions"] for r in runs if r.get("versions")), {})
    columns, rows = columns_and_rows(summary)
    return {"command": command, "commit": ", ".join(commits), "versions": versions,
            "constraints": None, "machine": machine, "columns": columns, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_tables",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the missing runs of a table")
    run.add_argument("--table", choices=sorted(TABLES), required=True)
    run.add_argument("--root", required=True)
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("extra", nargs="*", help="more flags for every run (after --)")
    hier = sub.add_parser("hier", help="the hierarchical table from the merges runs")
    hier.add_argument("--root", required=True)
    hier.add_argument("--seeds", default="0,1,2")
    hier.add_argument("--result", help="also write it as a benchmarks/results/ file")
    hier.add_argument("--machine", default="", help="for --result: where the runs ran")
    hier.add_argument("extra", nargs="*", help="more flags for every eval (after --)")
    show = sub.add_parser("render", help="print the Markdown table of a report JSON")
    show.add_argument("json_file")
    show.add_argument("--result", help="also write it as a benchmarks/results/ file")
    show.add_argument("--command", action="append", default=[],
                      help="for --result: a command that produced the runs (repeatable)")
    show.add_argument("--machine", default="", help="for --result: where the runs ran")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_table(args.table, args.root, [int(s) for s in args.seeds.split(",")], args.extra)
        return 0
    if args.command == "hier":
        columns, rows, commands = hier_table(args.root, [int(s) for s in args.seeds.split(",")],
                                             args.extra)
        print(markdown(columns, rows), end="")
        if args.result:
            with open(os.path.join(args.root, "merges", "hier_s0", "run.json"),
                      encoding="utf-8") as f:
                run = json.load(f)
            with open(args.result, "w", encoding="utf-8") as f:
                json.dump({"command": [f"python -m benchmarks.demo_tables run --table=merges "
                                       f"--root={args.root} (the trained runs)", *commands],
                           "commit": run.get("commit") or "unknown",
                           "versions": run.get("versions", {}), "constraints": None,
                           "machine": args.machine, "columns": columns, "rows": rows},
                          f, indent=1, ensure_ascii=False)
                f.write("\n")
        return 0
    try:
        with open(args.json_file, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {args.json_file}: {e}", file=sys.stderr)
        return 1
    print(render(summary), end="")
    if args.result:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result_file(summary, args.command, args.machine), f, indent=1,
                      ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
