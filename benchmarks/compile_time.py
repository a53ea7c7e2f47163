"""Compile time of one step of a config for a TPU topology: where the pre-flight's
minutes go.

    python -m benchmarks.compile_time --config=configs/voc_r101.py --step=eval \\
        --topology=v5e:2x2 --batch=4 model.dtype=bfloat16 'model.scales=(1.0,)'

Builds the step as ``--mode=preflight`` does (`scaleattn.preflight.Preflight`), lowers
and compiles it once and prints one JSON line: wall and CPU seconds of lowering and of
XLA's compile, the per-chip peak bytes, and the number of operations in the lowered
program (StableHLO lines), a load-independent measure of how much XLA is given to
compile. Overrides are ``section.key=value`` (Python literals).
"""

import argparse
import ast
import collections
import json
import os
import re
import resource
import time


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]")
    parser.add_argument("--step", choices=("train", "eval"), default="train")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument("--lower_only", action="store_true", help="lower, do not compile")
    parser.add_argument("--scopes", type=int, default=0, help="also count the lowered "
                        "operations by kind and by their first name scopes (top N)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # pylint: disable=import-outside-toplevel
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
    from scaleattn import preflight  # pylint: disable=import-outside-toplevel
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
    pre = preflight.Preflight.create(config, args.topology)
    key = "batch_size" if args.step == "train" else "eval.batch_size"
    batch = args.batch or config_lib.lookup(config, key)
    fn = pre.steps.train_fn if args.step == "train" else pre.steps.eval_fn
    jitted = pre.target.compile_step(fn, donate_state=args.step == "train")
    start, cpu = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*pre.arguments(args.step, batch))
    lower = (time.perf_counter() - start, time.process_time() - cpu)
    ops = sum(1 for line in lowered.as_text().splitlines() if " = " in line)
    if args.scopes:
        print(json.dumps(operation_counts(lowered.as_text(debug_info=True), args.scopes)))
    row = {"config": config.name, "step": args.step, "topology": args.topology,
           "global_batch": batch, "overrides": args.overrides,
           "lowered_ops": ops, "lower_s": round(lower[0], 1), "lower_cpu_s": round(lower[1], 1)}
    if args.lower_only:
        print(json.dumps(row))
        return
    start, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_ = (time.perf_counter() - start, time.process_time() - cpu)
    mem = compiled.memory_analysis()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({**row,
        "compile_s": round(compile_[0], 1), "compile_cpu_s": round(compile_[1], 1),
        "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_bytes_per_chip": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                                   + mem.generated_code_size_in_bytes),
        "jax": jax.__version__}))


if __name__ == "__main__":
    main()
