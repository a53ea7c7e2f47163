"""The committed pre-flight table: every shipped VOC / GSAG config compiled for a set of
Cloud TPU topologies, one JSON file per (config, topology, dtype) under
``benchmarks/results/preflight/``.

    python -m benchmarks.preflight_farm [--only=SUBSTRING] [--list] [--cache=DIR]

Resumable: a row whose JSON file exists (compiled at `EFFORT`) is skipped, so the farm
can be stopped and started again (compiles take minutes each on a small CPU host).
Every row is compiled with ``--config.parallel.exec_time_effort=-1`` (`EFFORT`): XLA's
TPU compile takes a fifth to a tenth of the CPU, for the same FLOPs; the peak per
chip is that program's, within about 15% of the default compile's, either way, on the
steps measured both ways (docs/preflight.md, "Compile time"). Each row runs
``python -m scaleattn.main --mode=preflight`` in a subprocess (the command is stored
in the row) at the config's batch; the ``__largest`` rows add ``--preflight_batch=auto``
(two to four more train-step compiles) for the (topology, dtype) pairs of
`AUTO_ROWS`. A persistent compilation cache (``--cache``) lets a ``__largest`` row
reuse the compiles of its plain row. The configs are read from ``configs/`` at run time
(`shipped_configs`): every variant of every ``voc*`` / ``gsag*`` file. Rows are ordered
cheapest first within each pass (`row_order`), the pod-sized rows (`POD_ROWS`) early.

After a farm run, ``python -m benchmarks.docs_tables`` renders the table into
docs/preflight.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "preflight")
TOPOLOGIES = ("v5e:2x2", "v5e:4x4", "v4:2x2x2", "v5p:2x2x1", "v6e:2x2")
AUTO_ROWS = (("v5e:2x2", "bfloat16"),)
# 64 chips, 16 hosts: the ResNet recipe, and the cheapest config to compile
POD_ROWS = (("voc_r101_s3", "v5e:8x8", "bfloat16"), ("voc_baseline", "v5e:8x8", "bfloat16"))
DTYPES = ("bfloat16", "float32")
EFFORT = -1.0  # config.parallel.exec_time_effort of every row (module docstring)
# Which program the rows compile: 2 since the device augmentation became matrix
# products (docs/preflight.md, "Device augmentation on a TPU"); rows of an older
# version are compiled again, and marked in the table until then.
FARM_VERSION = 2
PREFIXES = ("voc", "gsag")


def shipped_configs() -> list[tuple[str, str]]:
    """``[(config name, --config value)]`` of every shipped ``voc`` / ``gsag`` config
    (`scaleattn.config.shipped`: each file of ``configs/`` and each of its variants)."""
    from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
    found = []
    for spec in config_lib.shipped():
        if os.path.basename(spec).startswith(PREFIXES):
            found.append((config_lib.load(os.path.join(ROOT, spec)).name, spec))
    return found


def row_path(name: str, topology: str, dtype: str, batch: str = "config") -> str:
    suffix = "__largest" if batch == "auto" else ""
    return os.path.join(RESULTS,
                        f"{name}__{topology.replace(':', '_')}__{dtype}{suffix}.json")


def cost_rank(name: str) -> int:
    """Rough compile cost of a config by its name: VGG < ResNet-50 < ResNet-101 <
    ResNeXt; three scales cost more than one."""
    backbone = (3 if "x101" in name else 1 if "r50" in name else
                2 if ("r101" in name or name.startswith("gsag")) else 0)
    return backbone * 2 + ("_s3" in name or name.startswith("voc"))


def row_order(configs: list[tuple[str, str]]) -> list[tuple[str, str, str, str, str]]:
    """``[(name, spec, topology, dtype, batch)]``, cheapest first within each pass:
    v5e:2x2 bf16 at the config's batch, the pod rows, the largest-batch rows of
    `AUTO_ROWS`, then the other topologies, then float32."""
    configs = sorted(configs, key=lambda c: (cost_rank(c[0]), c[0]))
    specs = dict(configs)
    passes = [[(n, s, TOPOLOGIES[0], DTYPES[0], "config") for n, s in configs],
              [(n, specs[n], t, d, "config") for n, t, d in POD_ROWS if n in specs],
              [(n, s, t, d, "auto") for t, d in AUTO_ROWS for n, s in configs],
              [(n, s, t, DTYPES[0], "config") for t in TOPOLOGIES[1:] for n, s in configs],
              [(n, s, t, d, "config") for d in DTYPES[1:] for t in TOPOLOGIES
               for n, s in configs]]
    return [row for rows in passes for row in rows]


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                         capture_output=True, check=False)
    return out.stdout.strip() or "unknown"


def run_row(name: str, spec: str, topology: str, dtype: str, batch: str,
            cache: str | None) -> bool:
    """Compiles one row in a subprocess; writes its JSON (rows + command) on success."""
    path = row_path(name, topology, dtype, batch)
    tmp = path + ".part"
    command = ["python", "-m", "scaleattn.main", f"--config={spec}", "--mode=preflight",
               f"--topology={topology}", f"--config.model.dtype={dtype}",
               f"--config.parallel.exec_time_effort={EFFORT:g}",
               f"--preflight_batch={batch}", f"--output={os.path.relpath(tmp, ROOT)}"]
    env = dict(os.environ, PYTHONPATH=ROOT, TPU_SKIP_MDS_QUERY="1",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    start, commit = time.time(), git_commit()  # the code the row compiles
    proc = subprocess.run([sys.executable] + command[1:], cwd=ROOT, env=env, text=True,
                          capture_output=True, check=False)
    summary = [line for line in proc.stdout.splitlines() if line.strip()]
    if not os.path.exists(tmp):
        print(f"FAILED {os.path.basename(path)} (rc {proc.returncode}): "
              f"{(proc.stderr.strip().splitlines() or [''])[-1]}", flush=True)
        return False
    with open(tmp, encoding="utf-8") as f:
        rows = json.load(f)
    os.remove(tmp)
    result = {"command": " ".join(command[:-1]), "commit": commit, "farm_version": FARM_VERSION,
              "exit_status": proc.returncode, "summary": summary,
              "wall_s": round(time.time() - start, 1), "rows": rows}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"done {os.path.basename(path)} in {result['wall_s']:.0f} s", flush=True)
    return True


def have_row(path: str) -> bool:
    """Whether ``path`` holds a row compiled at `EFFORT` and `FARM_VERSION` (rows of
    another effort or an older version are compiled again)."""
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    rows = result["rows"]
    return (bool(rows) and rows[0].get("exec_time_effort", 0.0) == EFFORT
            and result.get("farm_version", 1) == FARM_VERSION)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="only rows whose name__topology__dtype "
                        "contains this")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--cache", default=None, help="a persistent JAX compilation "
                        "cache folder shared by the rows")
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    for name, spec, topology, dtype, batch in row_order(shipped_configs()):
        path = row_path(name, topology, dtype, batch)
        if args.only and args.only not in os.path.basename(path):
            continue
        if args.list:
            print(("have " if have_row(path) else "todo ") + os.path.basename(path))
            continue
        if not have_row(path):
            print(f"start {os.path.basename(path)} ({spec})", flush=True)
            run_row(name, spec, topology, dtype, batch, args.cache)


if __name__ == "__main__":
    main()
