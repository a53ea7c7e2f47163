"""The demo tables: the merges and the GSAG heads on `scale_shapes`, over seeds.

    python -m benchmarks.demo_tables run --table=merges --root=/tmp/demo_seeds [--seeds=0,1,2]
    python -m scaleattn.report /tmp/demo_seeds/merges/*/ --json=/tmp/demo_seeds/merges.json
    python -m benchmarks.demo_tables render /tmp/demo_seeds/merges.json \
        [--result=benchmarks/results/demo_merges.json --command=... --machine=...]
    python -m benchmarks.demo_tables hier --root=/tmp/demo_seeds \
        [--result=benchmarks/results/demo_hierarchical.json]
    python -m benchmarks.demo_tables crf --root=/tmp/demo_seeds \
        [--result=benchmarks/results/crf_demo.json]

``run`` trains every (row, seed) of a table, one after the other, each with
``python -m scaleattn.main`` in ``<root>/<table>/<row>_s<seed>``; a workdir that holds a
finished run (``run.json``) is skipped and one with checkpoints resumes, so the command
can be stopped and started again. Every row is the same recipe (``configs/demo.py``) with
only its merge or head changed (its variants, ``configs/demo.py:max`` ...).

``hier`` evaluates the merges table's hierarchical runs on other scale lists without
retraining (``--mode=eval --output``) and tabulates them beside its own and softmax
attention's final scores (`hier_table`).

``crf`` post-processes the merges table's attention runs with the dense CRF: DeepLab's
parameters, and the parameters a ``--mode=crf_search`` on the first seed's run picks
(`crf_table`).

``render`` turns the JSON of ``python -m scaleattn.report --json`` (`report.seed_summary`)
into the Markdown table of docs/results.md (`render`); ``--result`` also writes it as a
``benchmarks/results/`` file (`result_file`: columns, rows, commands, commit, library
versions), the form the docs' table generator reads.
"""

import argparse
import json
import os
import shlex
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


def main_command(config_file: str, workdir: str, mode: str, output: str, flags) -> list[str]:
    """``python -m scaleattn.main`` in ``mode`` on a trained run, writing ``output``."""
    return [sys.executable, "-m", "scaleattn.main", f"--config={config_file}",
            f"--workdir={workdir}", f"--mode={mode}", f"--output={output}", *flags]


def run_record(workdir: str) -> dict:
    """A finished run's ``run.json``."""
    with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
        return json.load(f)


def run_once(command: list[str], output: str) -> dict:
    """``output``'s JSON, after running ``command`` if that file is not there yet."""
    if not os.path.isfile(output):
        print("running: " + " ".join(command[1:]), flush=True)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        subprocess.run(command, check=True)
    with open(output, encoding="utf-8") as f:
        return json.load(f)


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
                values.append(run_record(workdir)["miou"])
                continue
            output = os.path.join(root, "hier_eval", f"{stem}_s{seed}_{scales.strip('()')}.json")
            command = main_command("configs/demo.py:hier", workdir, "eval", output,
                                   (f"--config.model.inference_scales={scales}", *extra))
            values.append(run_once(command, output)["miou"])
        if scales is not None:
            commands.append("python -m scaleattn.main --config=configs/demo.py:hier "
                            f"--workdir={root}/merges/hier_s<seed> --mode=eval "
                            f"--output=... --config.model.inference_scales='{scales}' "
                            + " ".join(extra))
        rows.append([label, "{1, 0.5}", evaluated_on, per_seed(values)])
    return columns, rows, commands


# The CRF table: (stem of its eval files, row, --mode=eval flags; None: the run's own
# final evaluation, no CRF). The searched row adds the flags of the search's best setting.
CRF_ROWS = (
    ("none", "no CRF", None),
    ("deeplab", "CRF, DeepLab-LargeFOV's parameters (w1 4, θα 121, θβ 5)",
     ("--config.eval.crf=True",)),
    ("searched", "CRF, searched", ("--config.eval.crf=True",)),
)
# The search grid, around the demo's image and object sizes (128-px images, radius 2.5-40
# px, colour noise) rather than DeepLab's 500-px photos: 27 settings.
CRF_SEARCH_FLAGS = ("--config.crf.search_bilateral_weights=(3.0,5.0,8.0)",
                    "--config.crf.search_bilateral_xy_stds=(10.0,20.0,40.0)",
                    "--config.crf.search_bilateral_rgb_stds=(5.0,10.0,20.0)")


def crf_table(root: str, seeds: list[int], extra: list[str]) -> tuple[list, list, list]:
    """The dense CRF on the merges table's attention runs (``root/merges/attention_s*``):
    no CRF (each run's own final score), DeepLab-LargeFOV's parameters, and the setting
    that ``--mode=crf_search`` (`CRF_SEARCH_FLAGS`, the first 100 val images) picks on
    the first seed's run, applied to every seed. ``(columns, rows, commands)``; the
    search and evaluations write to ``root/crf`` (skipped where their file exists)."""
    def command(workdir, mode, output, flags):
        return main_command("configs/demo.py", workdir, mode, output, (*flags, *extra))

    workdir = os.path.join(root, "merges", "attention_s{}")
    search_file = os.path.join(root, "crf", f"search_s{seeds[0]}.json")
    search = run_once(command(workdir.format(seeds[0]), "crf_search", search_file,
                              CRF_SEARCH_FLAGS), search_file)
    best = search["best"]
    commands = [shlex.join(["python", *command("RUN", "crf_search", "SEARCH.json",
                                               CRF_SEARCH_FLAGS)[1:]])]
    columns = ["", "val mIoU (per seed " + " / ".join(map(str, seeds)) + ")",
               "IoU " + " / ".join(CLASS_NAMES)]
    rows = []
    for stem, label, flags in CRF_ROWS:
        if stem == "searched":
            label = (f"CRF, searched on seed {seeds[0]}'s first {search['images']} val "
                     f"images (w1 {best['bilateral_weight']:g}, θα {best['bilateral_xy_std']:g},"
                     f" θβ {best['bilateral_rgb_std']:g})")
            flags = (*flags, *search["flags"].split())
        records = []
        for seed in seeds:
            if flags is None:
                records.append(run_record(workdir.format(seed)))
            else:
                output = os.path.join(root, "crf", f"{stem}_s{seed}.json")
                records.append(run_once(command(workdir.format(seed), "eval", output, flags),
                                        output))
        if flags is not None:
            commands.append(shlex.join(["python", *command("RUN", "eval", "EVAL.json",
                                                           flags)[1:]]))
        values = [r["miou"] for r in records]
        per_class = np.mean([r["per_class_iou"] for r in records], axis=0)
        rows.append([label, per_seed(values), " / ".join(f"{100 * v:.1f}" for v in per_class)])
    return columns, rows, commands


def mean_std(values) -> str:
    """'mean ± sample std' in % (one value: the value)."""
    values = 100 * np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def per_seed(values) -> str:
    """`mean_std` and each value: '72.0 ± 2.8 (70.0 / 74.0)'."""
    return mean_std(values) + " (" + " / ".join(f"{100 * v:.1f}" for v in values) + ")"


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


# The tables built on the merges runs: command -> (its table, the merges row whose run
# names the commit and library versions of the --result file).
DERIVED = {"hier": (hier_table, "hier"), "crf": (crf_table, "attention")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_tables",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the missing runs of a table")
    run.add_argument("--table", choices=sorted(TABLES), required=True)
    run.add_argument("--root", required=True)
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("extra", nargs="*", help="more flags for every run (after --)")
    for name, what in (("hier", "the hierarchical table"), ("crf", "the dense-CRF table")):
        derived = sub.add_parser(name, help=f"{what} from the merges runs")
        derived.add_argument("--root", required=True)
        derived.add_argument("--seeds", default="0,1,2")
        derived.add_argument("--result", help="also write it as a benchmarks/results/ file")
        derived.add_argument("--machine", default="", help="for --result: where the runs ran")
        derived.add_argument("extra", nargs="*", help="more flags for every eval (after --)")
    show = sub.add_parser("render", help="print the Markdown table of a report JSON")
    show.add_argument("json_file")
    show.add_argument("--result", help="also write it as a benchmarks/results/ file")
    show.add_argument("--command", action="append", default=[], dest="commands",
                      help="for --result: a command that produced the runs (repeatable)")
    show.add_argument("--machine", default="", help="for --result: where the runs ran")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_table(args.table, args.root, [int(s) for s in args.seeds.split(",")], args.extra)
        return 0
    if args.command in DERIVED:
        seeds = [int(s) for s in args.seeds.split(",")]
        table, stem = DERIVED[args.command]
        columns, rows, commands = table(args.root, seeds, args.extra)
        print(markdown(columns, rows), end="")
        if args.result:
            run = run_record(os.path.join(args.root, "merges", f"{stem}_s{seeds[0]}"))
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
            json.dump(result_file(summary, args.commands, args.machine), f, indent=1,
                      ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
