"""The pre-flight table of docs/preflight.md, rendered from the JSON files that
`benchmarks.preflight_farm` wrote under ``benchmarks/results/preflight/``.

`render(results)` is a pure function of the loaded files (`load`);
``python -m benchmarks.docs_tables`` writes it into the page with the other tables.
"""

import glob
import json
import os

from benchmarks.preflight_farm import FARM_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "preflight")
GiB = 2**30


def load(folder: str = RESULTS) -> list[dict]:
    """Every farm file of ``folder`` (``{'command', 'commit', 'rows': [...]}``), sorted."""
    results = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        result["file"] = os.path.basename(path)
        for row in result["rows"]:  # which program the farm compiled (`FARM_VERSION`)
            row.setdefault("farm_version", result.get("farm_version", 1))
        results.append(result)
    return results


def _step(result: dict, step: str) -> dict | None:
    return next((r for r in result["rows"] if r.get("step") == step), None)


def _gib(n) -> str:
    return "–" if n is None else f"{n / GiB:.1f}"


def _fits(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{'yes' if row['fits'] else '**no**'} ({_gib(row['peak_bytes_per_chip'])})"


def _largest(result: dict) -> str:
    rows = [r for r in result["rows"] if r.get("step") == "largest_batch"]
    if not rows:
        return "–"
    best = max(rows, key=lambda r: (r.get("largest_batch") or 0, r["predicted_batch"]))
    others = ", ".join(f"{r['param_sharding']} ≈{r['predicted_batch']}" for r in rows
                       if r is not best)
    bound = "≥" if best.get("largest_batch_is_lower_bound") else ""
    text = f"{bound}{best['largest_batch']} ({best['param_sharding']})"
    return text + (f"; {others}" if others else "")


def _stale(row: dict) -> str:
    """'‡' for a row the farm compiled from an older program (`FARM_VERSION`)."""
    return "‡" if row.get("farm_version", FARM_VERSION) < FARM_VERSION else ""


STALE_NOTE = ("‡ compiled before the device augmentation became matrix products: the "
              "estimates count its former per-pixel gather (\"Device augmentation on a "
              "TPU\"); the farm compiles these rows again.")


def _ms(seconds) -> str:
    return "–" if not seconds else f"{seconds * 1e3:.0f}"


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def merge(results: list[dict]) -> dict:
    """``{(config, topology, dtype): rows}``: the rows of every file of one config,
    topology and dtype together (a ``__largest`` file adds its largest-batch rows to the
    plain file's train and eval rows)."""
    merged = {}
    for result in sorted(results, key=lambda r: r.get("file", "")):
        train = _step(result, "train")
        if train is not None:
            rows = merged.setdefault((train["config"], train["topology"], train["dtype"]), [])
            have = {r["step"] for r in rows}
            rows += [r for r in result["rows"]
                     if r["step"] == "largest_batch" or r["step"] not in have]
    return merged


def _config_name(train: dict) -> str:
    return train["config"].replace(f"+dtype={train['dtype']}", "")  # dtype: its own column


def _topology_order(topology: str, chips: int) -> tuple:
    return (topology.split(":")[0] != "v5e", chips, topology)  # v5e by size, then the others


def glance(results: list[dict], dtype: str) -> str:
    """One line per config, one column per topology, for ``dtype``: each cell the train
    step's est. img/s and est. chip-hours for the schedule ('344 · 0.8 h'), '**no**
    (GiB)' where it does not fit, '–' where not compiled; '†' where the batch was rounded
    up to divide over the chips, '‡' where compiled from an older program (as in
    `render`)."""
    trains = {key: _step({"rows": rows}, "train") for key, rows in merge(results).items()
              if key[2] == dtype}
    if not trains:
        return f"No {dtype} rows compiled yet.\n"
    topologies = sorted({(t["topology"], t["chips"]) for t in trains.values()},
                        key=lambda tc: _topology_order(*tc))
    cells = {}  # config -> topology -> text
    for train in trains.values():
        note = ("†" if train.get("batch_note") else "") + _stale(train)
        if not train["fits"]:
            text = f"**no** ({_gib(train['peak_bytes_per_chip'])} GiB)"
        else:
            text = (f"{_num(train.get('est_img_per_s'), '.0f')} · "
                    f"{_num(train.get('est_chip_hours'), '.1f')} h{note}")
        cells.setdefault(_config_name(train), {})[train["topology"]] = text
    lines = ["| config | " + " | ".join(f"{t} ({c})" for t, c in topologies) + " |",
             "|---|" + "---|" * len(topologies)]
    for name in sorted(cells):
        lines.append(f"| {name} | " + " | ".join(cells[name].get(t, "–") for t, _ in topologies)
                     + " |")
    if any(_stale(train) for train in trains.values()):
        lines += ["", STALE_NOTE]
    return "\n".join(lines) + "\n"


# The rows the prose of "How far a compiler estimate can be from a measured step" reads:
# one config at two per-chip batches, and the ResNet recipe on three v5e slices.
GAP_ROWS = (("voc_avg", "bfloat16", ("v5e:2x2", "v5e:4x4")),
            ("voc_r101_s3", "bfloat16", ("v5e:2x2", "v5e:4x4", "v5e:8x8")))


def gap(results: list[dict], examples=GAP_ROWS) -> str:
    """The figures behind the caveats of the estimate, from the rows of the current
    program (`FARM_VERSION`): for each ``(config, dtype, topologies)`` of ``examples``
    the train step's images, XLA's bytes and flops per chip, the estimate's basis and
    MFU, and XLA's own ``optimal_seconds``; under it, how often ``optimal_seconds`` came
    back negative over every current row."""
    merged = merge(results)
    lines = ["| config | topology | dtype | images per chip | XLA GB per chip "
             "| XLA GB per image | XLA TFLOP per chip | est. basis | est. img/s per chip "
             "| est. MFU | XLA optimal_seconds |", "|" + "---|" * 11]
    for config, dtype, topologies in examples:
        for topology in topologies:
            train = _step({"rows": merged.get((config, topology, dtype), [])}, "train")
            if train is None or _stale(train):
                continue
            per_chip = train["global_batch"] / train["chips"]
            gb = train["bytes_accessed_per_chip"] / 1e9
            lines.append(
                f"| {config} | {topology} | {dtype} | {per_chip:g} | {gb:.1f} "
                f"| {gb / per_chip:.2f} | {train['flops_per_chip'] / 1e12:.1f} "
                f"| {train['est_basis'].split(':')[0]} "
                f"| {train['est_img_per_s'] / train['chips']:.0f} "
                f"| {_num(train.get('est_mfu'), '.0%')} "
                f"| {_num(train.get('xla_optimal_s_raw'), '.3g')} |")
    counts = {}
    for rows in merged.values():
        for row in rows:
            if row["step"] in ("train", "eval") and not _stale(row):
                raw = row.get("xla_optimal_s_raw")
                counts.setdefault(row["step"], [0, 0])[raw is not None and raw < 0] += 1
    lines += ["", "XLA's `optimal_seconds` over every row of the current program: negative for "
              + " and ".join(f"{neg} of {pos + neg} {step} steps"
                             for step, (pos, neg) in sorted(counts.items(), reverse=True))
              + " (`xla_optimal_s_raw`)."]
    return "\n".join(lines) + "\n"


def render(results: list[dict]) -> str:
    """The Markdown table (one line per config x topology x dtype, the largest-batch
    rows merged into theirs) and the provenance lines under it."""
    merged = merge(results)
    lines = [
        "| config | topology (chips, hosts) | dtype | mode / params | train batch | "
        "train fits (GiB/chip) | eval fits (GiB/chip) | largest train batch | "
        "est. train step ms | est. img/s | est. MFU | est. chip-hours (schedule) | "
        "compile s, wall (CPU; XLA effort), train + eval |",
        "|" + "---|" * 13]
    def order(key):
        train = _step({"rows": merged[key]}, "train")
        return (key[0], key[2]) + _topology_order(key[1], train["chips"])

    for key in sorted(merged, key=order):
        result = {"rows": merged[key]}
        train, evaluation = _step(result, "train"), _step(result, "eval")
        steps_compiled = [r for r in (train, evaluation) if r]
        compile_s = sum(r["lower_s"] + r["compile_s"] for r in steps_compiled)
        cpu = [r.get("lower_cpu_s", 0) + r.get("compile_cpu_s", 0) for r in steps_compiled
               if "compile_cpu_s" in r]
        effort = f"effort {train.get('exec_time_effort', 0.0):g}"
        compile_text = f"{compile_s:.0f} (" + (f"{sum(cpu):.0f} CPU; " if cpu else "") + effort + ")"
        note = (" †" if train.get("batch_note") else "") + _stale(train)
        name = _config_name(train)
        lines.append(
            f"| {name} | {train['topology']} ({train['chips']}, {train['hosts']}) "
            f"| {train['dtype']} | {train['parallel_mode']} / {train['param_sharding']} "
            f"| {train['global_batch']}{note} | {_fits(train)} | {_fits(evaluation)} "
            f"| {_largest(result)} | {_ms(train.get('est_step_s'))} "
            f"| {_num(train.get('est_img_per_s'), '.0f')} "
            f"| {_num(train.get('est_mfu'), '.0%')} "
            f"| {_num(train.get('est_chip_hours'), '.1f')} ({train.get('train_steps', '–')} steps) "
            f"| {compile_text} |")
    if not merged:
        return "No rows compiled yet: `python -m benchmarks.preflight_farm`.\n"
    versions = sorted({(r["rows"][0].get("jax"), r["rows"][0].get("libtpu"), r.get("commit"))
                       for r in results if r["rows"]})
    lines += ["", "Rows from: " + "; ".join(
        f"commit {commit}, jax {jax_v}, libtpu {libtpu}" for jax_v, libtpu, commit in versions)
        + ". Commands: `python -m benchmarks.preflight_farm` (each row's exact command is "
          "in its JSON file under `benchmarks/results/preflight/`)."]
    efforts = sorted({r["rows"][0].get("exec_time_effort", 0.0) for r in results if r["rows"]})
    lines.append("Compiled with XLA's exec_time_optimization_effort (`parallel.exec_time_effort`) "
                 + " and ".join(f"{e:g}" + (" (XLA's default)" if e == 0 else "")
                                for e in efforts) + ".")
    if any(_stale(r) for result in results for r in result["rows"]):
        lines.append(STALE_NOTE)
    if any(_step(r, "train").get("batch_note") for r in results if _step(r, "train")):
        lines.append("† the config's batch does not divide over the topology's chips "
                     "(`--mode=train` would stop); compiled at the next batch that does.")
    return "\n".join(lines) + "\n"
