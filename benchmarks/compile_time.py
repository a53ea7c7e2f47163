"""Compile time of one step of a config for a TPU topology: where the pre-flight's
minutes go.

    python -m benchmarks.compile_time --config=configs/voc_r101.py --step=eval \\
        --topology=v5e:2x2 --batch=4 model.dtype=bfloat16 'model.scales=(1.0,)'

Builds the step as ``--mode=preflight`` does (`scaleattn.preflight.Preflight`), lowers
and compiles it once and prints one JSON line: wall and CPU seconds of lowering and of
XLA's compile, the per-chip peak bytes, and the number of operations in the lowered
program (StableHLO lines), a load-independent measure of how much XLA is given to
compile. Overrides are ``section.key=value`` (Python literals).

The effort table of docs/preflight.md ("Compile time") compiles a step at XLA's default
effort and at ``parallel.exec_time_effort=-1``, each with ``--append=FILE.jsonl``, then
writes the table with ``--table_from=FILE.jsonl
--result=benchmarks/results/compile_effort.json``.
"""

import argparse
import ast
import collections
import json
import os
import re
import resource
import shlex


def operation_counts(text: str, top: int, depth: int = 4) -> dict:
    """``{'kinds': [(op, n)], 'scopes': [(scope, n)]}``: the operations of a lowered
    program (StableHLO text with debug locations) by kind and by the first ``depth``
    parts of the name scope JAX gave them (``jvp(MultiScaleSegmenter)/net/backbone/...``)."""
    locations = dict(re.findall(r"^(#loc\d+) = loc\((.*)\)$", text, re.M))
    kinds, scopes = collections.Counter(), collections.Counter()
    for line in text.splitlines():
        if " = " not in line or line.startswith("#loc"):
            continue
        kind = re.search(r'=\s*"?([\w.]+)"?[ (]', line)
        if kind:
            kinds[kind.group(1)] += 1
        where = re.search(r"loc\((#loc\d+)\)", line)
        name = re.search(r'"([^"]*)"', locations.get(where.group(1), "") if where else "")
        parts = [p for p in (name.group(1) if name else "").split("/") if p]
        scopes["/".join(parts[:depth]) or "(none)"] += 1
    return {"kinds": kinds.most_common(top), "scopes": scopes.most_common(top)}


EFFORT_COLUMNS = ["config", "step", "topology", "global batch", "XLA effort",
                  "compile CPU s", "compile wall s", "peak per chip (MiB)",
                  "XLA GFLOP per chip", "XLA GB accessed per chip", "roofline ms"]


def effort_table(lines: list[dict]) -> list[list]:
    """The rows of the effort table from ``--append`` lines (one per compile), in
    file order; the roofline as the pre-flight computes it (`preflight.roofline`)."""
    from scaleattn import preflight  # pylint: disable=import-outside-toplevel
    rows = []
    for r in lines:
        seconds, _ = preflight.roofline(r["flops_per_chip"], r["bytes_accessed_per_chip"],
                                        preflight.chip_of(r["topology"]))
        rows.append([r["config"], r["step"], r["topology"], r["global_batch"],
                     r["exec_time_effort"], r["compile_cpu_s"], r["compile_s"],
                     round(r["peak_bytes_per_chip"] / 2**20, 1),
                     round(r["flops_per_chip"] / 1e9, 1),
                     round(r["bytes_accessed_per_chip"] / 1e9, 2), round(seconds * 1e3, 1)])
    return rows


def write_table(jsonl: str, result: str) -> None:
    """``--table_from=JSONL --result=FILE``: the docs table (docs_tables' format) of the
    compiles appended to ``jsonl``, with their commands, commits and versions."""
    with open(jsonl, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    effort = re.compile(r"parallel\.exec_time_effort=\S+")
    out = {"command": sorted({effort.sub("parallel.exec_time_effort=E", line["command"])
                              for line in lines}) + ["(E: the XLA effort column)"],
           "commit": ", ".join(sorted({line["commit"] for line in lines})),
           "versions": {k: lines[0][k] for k in ("jax", "jaxlib", "libtpu") if k in lines[0]},
           "constraints": None,
           "machine": "a 2-core CPU host (compile CPU seconds are the process's, which "
                      "other jobs do not inflate; wall seconds are)",
           "columns": EFFORT_COLUMNS, "rows": effort_table(lines)}
    with open(result, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="configs/FILE.py[:VARIANT]")
    parser.add_argument("--step", choices=("train", "eval"), default="train")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument("--lower_only", action="store_true", help="lower, do not compile")
    parser.add_argument("--scopes", type=int, default=0, help="also count the lowered "
                        "operations by kind and by their first name scopes (top N)")
    parser.add_argument("--append", default="", help="also append the row (with its "
                        "command, commit and versions) to this JSON-lines file")
    parser.add_argument("--table_from", default="", help="compile nothing: write the "
                        "table of this --append file to --result")
    parser.add_argument("--result", default="", help="with --table_from: the JSON to write")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if args.table_from:
        write_table(args.table_from, args.result)
        return
    if not args.config:
        parser.error("--config is required")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # pylint: disable=import-outside-toplevel
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
    from scaleattn import parallel, preflight  # pylint: disable=import-outside-toplevel
    config = config_lib.load(args.config)
    for item in args.overrides:
        key, value = item.split("=", 1)
        section, name = key.rsplit(".", 1)
        target = config_lib.lookup(config, section)
        try:
            target[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            target[name] = value
    jax.config.update("jax_default_prng_impl", config.prng_impl)
    effort = parallel.set_compile_effort(config.parallel)
    pre = preflight.Preflight.create(config, args.topology)
    key = "batch_size" if args.step == "train" else "eval.batch_size"
    # a batch that does not divide over the chips: the next one up, as the pre-flight does
    batch, _ = pre.runnable_batch(args.batch or config_lib.lookup(config, key), key)
    fn = pre.steps.train_fn if args.step == "train" else pre.steps.eval_fn
    jitted = pre.target.compile_step(fn, donate_state=args.step == "train")
    lowered = jitted.lower(*pre.arguments(args.step, batch))
    ops = sum(1 for line in lowered.as_text().splitlines() if " = " in line)
    if args.scopes:
        print(json.dumps(operation_counts(lowered.as_text(debug_info=True), args.scopes)))
    row = {"config": config.name, "step": args.step, "topology": args.topology,
           "global_batch": batch, "overrides": args.overrides, "exec_time_effort": effort,
           "lowered_ops": ops}
    if args.lower_only:
        print(json.dumps(row))
        return
    # lowered again inside, timed; then XLA's compile for the topology's chip
    result = preflight.compile_step(jitted, pre.arguments(args.step, batch),
                                    pre.chip.compiler_options)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row.update({k: round(result[k], 1) for k in ("lower_s", "lower_cpu_s", "compile_s",
                                                  "compile_cpu_s")})
    row.update({"process_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                **{k: result.get(k) for k in ("peak_bytes_per_chip", "temp_bytes",
                                              "flops_per_chip", "bytes_accessed_per_chip")},
                **preflight.library_versions()})
    print(json.dumps(row))
    if args.append:
        command = " ".join(["python -m benchmarks.compile_time", f"--config={args.config}",
                            f"--step={args.step}", f"--topology={args.topology}"]
                           + ([f"--batch={args.batch}"] if args.batch else [])
                           + [shlex.quote(o) for o in args.overrides])
        from benchmarks.preflight_farm import git_commit  # pylint: disable=import-outside-toplevel
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "command": command, "commit": git_commit()}) + "\n")


if __name__ == "__main__":
    main()
