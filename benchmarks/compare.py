"""scaleattn (JAX) against its PyTorch peer: same config, same process tree, one table.

    python -m benchmarks.compare --config=configs/voc_r101.py \\
        [--config.model.width=0.25 --config.bench.batch_size=2 ...] \\
        [--peer_args="--compile"] [--rounds=3] [--cpus=0] [--output_dir=bench_out]

Every ``--config*`` argument goes to both ``python -m scaleattn.main --mode=bench``
and ``benchmarks/torch_peer.py``, which run one after the other (never at the same
time, they would share the cores) as child processes of this one; with ``--rounds``
they alternate that many times and each keeps its best round (`best_of`). Their JSON reports
are joined per dtype into ``compare.json`` and a Markdown table (``compare.md``, also
printed): train and eval images/s of both, the JAX/PyTorch ratio, compile (first
step) times, and MFU of both computed with the same FLOP count: the model FLOPs of
the step (`scaleattn.flops`, in the JAX report; the same model, so the same count
for the peer), n/a on a device without a known peak.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ratio(a, b):
    return None if not a or not b else a / b


def peer_mfu(jax_row: dict, torch_row: dict, peak: float | None) -> float | None:
    """The peer's MFU with the FLOP count of JAX's MFU for the same step: the model
    FLOPs (``train_model_flops``; reports from before that key: ``train_flops``, XLA's
    count, which their MFU used). None without a peak."""
    flops = jax_row.get("train_model_flops", jax_row.get("train_flops"))
    if flops is None or peak is None:
        return None
    return flops / torch_row["train_step_s"] / peak


def compare_rows(jax_report: dict, torch_report: dict) -> list[dict]:
    """One dict per JAX row (dtype x dilated-conv lowering) whose dtype the peer has."""
    peak = jax_report["setup"].get("peak_flops")
    peers = {r["dtype"]: r for r in torch_report["results"]}
    rows = []
    for j in jax_report["results"]:
        t = peers.get(j["dtype"])
        if t is None:
            continue
        rows.append({
            "dtype": j["dtype"],
            "dilated_conv": j.get("dilated_conv", "native"),
            "params_match": j["num_params"] == t["num_params"],
            "num_params": j["num_params"],
            "jax_train_images_per_s": j["train_images_per_s"],
            "torch_train_images_per_s": t["train_images_per_s"],
            "train_ratio": ratio(j["train_images_per_s"], t["train_images_per_s"]),
            "jax_eval_images_per_s": j["eval_images_per_s"],
            "torch_eval_images_per_s": t["eval_images_per_s"],
            "eval_ratio": ratio(j["eval_images_per_s"], t["eval_images_per_s"]),
            "jax_compile_s": j["compile_train_s"] + j["compile_eval_s"],
            "torch_first_steps_s": t["compile_train_s"] + t["compile_eval_s"],
            "jax_train_mfu": j.get("train_mfu"),
            "torch_train_mfu": peer_mfu(j, t, peak),
            "jax_peak_memory_bytes": j.get("peak_memory_bytes"),
            "torch_peak_memory_bytes": t.get("peak_memory_bytes"),
        })
    return rows


def best_of(reports: list[dict]) -> dict:
    """One report from several rounds: per dtype (and dilated-conv lowering) the
    fastest train step (and its row), the fastest eval step; on a shared machine the
    best round is the least disturbed one."""
    rows = {}
    for report in reports:
        for row in report["results"]:
            best = rows.setdefault((row["dtype"], row.get("dilated_conv")), dict(row))
            if row["train_step_s"] < best["train_step_s"]:
                keep = {k: best[k] for k in ("eval_step_s", "eval_images_per_s",
                                             "eval_mfu") if k in best}
                best.clear()
                best.update(row, **keep)
            if row["eval_step_s"] < best["eval_step_s"]:
                for key in ("eval_step_s", "eval_images_per_s", "eval_mfu"):
                    if key in row:
                        best[key] = row[key]
    setup = dict(reports[0]["setup"], rounds=len(reports))
    return {"setup": setup, "results": list(rows.values())}


def num(value, digits=2, scale=1.0, suffix=""):
    return "n/a" if value is None else f"{value * scale:.{digits}f}{suffix}"


def markdown(rows: list[dict], jax_report: dict, torch_report: dict) -> str:
    s, t = jax_report["setup"], torch_report["setup"]
    lines = [
        f"{s['config']}: {s['backbone']}/{s['head']}, width {s['width']}, depth "
        f"{s['depth'] or 'standard'}, scales {s['scales']} ({s['merge']}), batch "
        f"{s['batch_size']} x {s['crop_size']}², {s['num_classes']} classes. Device: "
        f"{s['device']} ({s['platform']}, {s['host_cores']} host cores, "
        f"{s.get('cpus_allowed', s['host_cores'])} usable); jax {s['jax']}, "
        f"torch {t['torch']} ({t['threads']} threads, channels_last={t['channels_last']}, "
        f"compile={t['compile']}). Median of {s['steps']} steps after {s['warmup']} warm-up"
        f"{', best of %d alternating rounds' % s['rounds'] if s.get('rounds', 1) > 1 else ''}.",
        "",
        "| dtype | JAX dilated convs | JAX train img/s | PyTorch train img/s "
        "| JAX / PyTorch train "
        "| JAX eval img/s | PyTorch eval img/s | JAX / PyTorch eval "
        "| JAX compile (s) | PyTorch first steps (s) | MFU JAX | MFU PyTorch | params equal |",
        "|" + "---|" * 13]
    for r in rows:
        lines.append("| " + " | ".join([
            r["dtype"], r["dilated_conv"], num(r["jax_train_images_per_s"]), num(r["torch_train_images_per_s"]),
            num(r["train_ratio"], suffix="×"), num(r["jax_eval_images_per_s"]),
            num(r["torch_eval_images_per_s"]), num(r["eval_ratio"], suffix="×"),
            num(r["jax_compile_s"], 1), num(r["torch_first_steps_s"], 1),
            num(r["jax_train_mfu"], 1, 100, "%"), num(r["torch_train_mfu"], 1, 100, "%"),
            f"{'yes' if r['params_match'] else 'NO'} ({r['num_params']:,})"]) + " |")
    return "\n".join(lines) + "\n"


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="bench_out")
    parser.add_argument("--cpus", default="",
                        help="comma-separated CPU ids both children are pinned to (Linux)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate JAX and PyTorch runs this many times, keep the best")
    parser.add_argument("--peer_args", default="",
                        help="extra flags for torch_peer.py, e.g. '--compile'")
    args, config_args = parser.parse_known_args(argv)
    unknown = [a for a in config_args if not a.startswith("--config")]
    if unknown or not any(a.startswith("--config=") for a in config_args):
        parser.error(f"expected --config=FILE and --config.* overrides, got {unknown}")
    if args.cpus:  # inherited by both children: equal cores, and torch sizes its pool by it
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    jax_reports, torch_reports = [], []
    for r in range(args.rounds):
        jax_json = os.path.join(out, f"jax_{r}.json")
        torch_json = os.path.join(out, f"torch_{r}.json")
        run([sys.executable, "-m", "scaleattn.main", "--mode=bench", *config_args,
             f"--output={jax_json}"])
        run([sys.executable, "-m", "benchmarks.torch_peer", *config_args,
             *args.peer_args.split(), f"--output={torch_json}"])
        for path, reports in ((jax_json, jax_reports), (torch_json, torch_reports)):
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
    jax_report, torch_report = best_of(jax_reports), best_of(torch_reports)
    rows = compare_rows(jax_report, torch_report)
    text = markdown(rows, jax_report, torch_report)
    print(text, end="")
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump({"jax": jax_report, "torch": torch_report, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
