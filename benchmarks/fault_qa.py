"""Fault-injection pass over the entry points: every fault, its command, what happened.

    python benchmarks/fault_qa.py --out=/tmp/fault_qa [--json=benchmarks/results/fault_qa.json]

Trains one tiny demo run (4 steps, checkpoints at 2 and 4) in ``--out``, then runs each
fault of `faults` as the command line a user would type (``python -m scaleattn.main``,
``scaleattn.report``, ``scaleattn.convert``, the launchers), one after the other, and
records its exit status and its last line on stderr (or, for a fault whose correct
answer is to work, what it did). Prints a Markdown table (fault, exit status, outcome)
and writes the records as JSON, with the commit and the library versions. Nothing outside ``--out`` is written.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY = ["--config=configs/demo.py", "--config.data.demo_train_size=16",
        "--config.data.demo_val_size=8", "--config.data.crop_size=48",
        "--config.model.width=0.0625", "--config.model.fc_width=64", "--config.batch_size=8",
        "--config.eval.batch_size=8", "--config.train.steps=4", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2", "--config.parallel.mode=jit",
        "--config.predict.summary_images=0"]


def env() -> dict:
    return dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)


def main_cmd(out: str, workdir: str, *extra: str) -> list[str]:
    return [PY, "-m", "scaleattn.main", *TINY, f"--config.data.data_dir={out}/data",
            f"--workdir={workdir}", *extra]


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def copy(out: str, name: str) -> str:
    target = os.path.join(out, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(os.path.join(out, "trained"), target)
    return target


def faults(out: str) -> list[dict]:
    """``[{'fault', 'argv', 'setup' (optional callable), 'limit' (RLIMIT_FSIZE),
    'env', 'beside' (a command started at the same time)}]``."""
    trained = os.path.join(out, "trained")
    fresh = lambda name: os.path.join(out, name)  # noqa: E731
    m = lambda workdir, *extra: main_cmd(out, workdir, *extra)  # noqa: E731
    items = [
        ("update overflows, loss finite (base_lr=1e38, checkpoint every step)",
         m(fresh("lr1e38"), "--config.optim.base_lr=1e38", "--config.train.checkpoint_every=1")),
        ("update overflows in a 1-step run", m(fresh("lr1e38_1"), "--config.optim.base_lr=1e38",
                                               "--config.train.steps=1")),
        ("report --output=RUN/run.json", [PY, "-m", "scaleattn.report", trained,
                                          f"--output={trained}/run.json"]),
        ("crf_search --output=WORKDIR/run.json", m(trained, "--mode=crf_search",
                                                   f"--output={trained}/run.json")),
        ("convert SRC SRC", [PY, "-m", "scaleattn.convert", "--from=torchvision",
                             "--arch=vgg16", f"{out}/src.pth", f"{out}/src.pth"]),
        ("negative learning rate", m(fresh("v"), "--config.optim.base_lr=-0.01")),
        ("step schedule with step_size=0", m(fresh("v"), "--config.optim.schedule=step",
                                             "--config.optim.step_size=0")),
        ("model.width=0.0", m(fresh("v"), "--config.model.width=0.0")),
        ("model.scales=(1.0, 1.0)", m(fresh("v"), "--config.model.scales=(1.0,1.0)")),
        ("model.scales=(1.0, 0.001)", m(fresh("v"), "--config.model.scales=(1.0,0.001)")),
        ("OHEM threshold -1, min_kept -5", m(fresh("v"), "--config.loss.type=ohem",
                                             "--config.loss.ohem_threshold=-1.0",
                                             "--config.loss.ohem_min_kept=-5")),
        ("negative weight decay", m(fresh("v"), "--config.optim.weight_decay=-0.0005")),
        ("momentum 5", m(fresh("v"), "--config.optim.momentum=5.0")),
        ("eval.max_batches=-1", m(fresh("v"), "--config.eval.max_batches=-1")),
        ("convert --mean=nan,...", [PY, "-m", "scaleattn.convert", "--from=torchvision",
                                    "--arch=vgg16", "--mean=nan,1,1", f"{out}/src.pth",
                                    f"{out}/dst.msgpack"]),
        ("convert --std=0,0,0", [PY, "-m", "scaleattn.convert", "--from=torchvision",
                                 "--arch=vgg16", "--std=0,0,0", f"{out}/src.pth",
                                 f"{out}/dst.msgpack"]),
        ("labels >= num_classes (num_classes=2 on 4-class data)",
         m(fresh("labels"), "--config.model.num_classes=2")),
        ("data.std of zeros", m(fresh("v"), "--config.data.std=(0.0,0.0,0.0)")),
        ("checkpoint folder renamed (4 -> 6)",
         m(copy(out, "renamed"), "--config.train.steps=8"),
         lambda: os.rename(f"{out}/renamed/checkpoints/4", f"{out}/renamed/checkpoints/6")),
        ("train.steps below the checkpoint's step", m(copy(out, "below"),
                                                      "--config.train.steps=2")),
        ("resume with another batch_size", m(copy(out, "batch"), "--config.train.steps=6",
                                             "--config.batch_size=4")),
        ("resume with an init_from it never loads",
         m(copy(out, "init"), "--config.train.steps=6",
           f"--config.model.init_from={out}/never.msgpack")),
        ("benchmarks/crf_figure.py", [PY, "benchmarks/crf_figure.py", *TINY,
                                      f"--config.data.data_dir={out}/data",
                                      f"--workdir={trained}", f"--output={out}/crf.png",
                                      "--images=0"]),
        ("predict --output into checkpoints/", m(trained, "--mode=predict",
                                                 f"--input={out}/images",
                                                 f"--output={trained}/checkpoints/4")),
        ("predict --output equal to --input", m(trained, "--mode=predict",
                                                f"--input={out}/images",
                                                f"--output={out}/images")),
        ("report: the same run twice", [PY, "-m", "scaleattn.report", trained, trained]),
        ("report: same-named runs that differ in other keys",
         [PY, "-m", "scaleattn.report", trained, f"{out}/batch"]),
        ("tpu_vm.py --dry-run, config file missing",
         [PY, "launch/tpu_vm.py", "train", "--name=n", "--project=p", "--zone=z",
          "--workdir=gs://b/r", "--config=configs/missing.py", "--dry-run"]),
        ("slurm_gpu.py --nodes=0", [PY, "launch/slurm_gpu.py", f"--workdir={out}/slurm",
                                    "--nodes=0", "--dry-run"]),
        ("disk full / file-size limit, async save", m(copy(out, "full_async"),
                                                      "--config.train.steps=6"), None, True),
        ("disk full / file-size limit, sync save",
         m(copy(out, "full_sync"), "--config.train.steps=6",
           "--config.train.async_checkpoints=false"), None, True),
        ("damaged dataset records", m(fresh("damaged"), f"--config.data.data_dir={out}/bad_data"),
         lambda: damage_data(out)),
        ("unknown eval_split", m(fresh("v"), "--config.data.eval_split=test")),
        ("canvas_size smaller than the images", m(fresh("v"), "--config.data.augment_on=device",
                                                  "--config.data.canvas_size=64")),
        ("eval_size smaller than the images", m(fresh("v"), "--config.data.eval_size=64")),
        ("negative shuffle_buffer", m(fresh("v"), "--config.data.shuffle_buffer=-1")),
        ("ms_scales with 0", m(fresh("v"), "--config.predict.ms_scales=(0.0,1.0)")),
        ("ms_scales negative", m(fresh("v"), "--config.predict.ms_scales=(-0.5,1.0)")),
        ("a scale so large memory runs out", m(fresh("v"), "--config.model.scales=(1.0,50.0)")),
        ("data.mean of the wrong length", m(fresh("v"), "--config.data.mean=(127.5,127.5)")),
        ("scale_range of one value", m(fresh("v"), "--config.data.scale_range=(0.5,)")),
        ("VGG depth of the wrong length", m(fresh("v"), "--config.model.depth=(1,1,1)")),
        ("bench.steps=0", m(fresh("v"), "--mode=bench", "--config.bench.steps=0")),
        ("JAX_PLATFORMS=cuda on a CPU-only JAX", m(fresh("v"), "--mode=bench"), None, False,
         {"JAX_PLATFORMS": "cuda"}),
        ("two first runs at once on a fresh data_dir (the second of two)",
         m(fresh("race_b"), f"--config.data.data_dir={out}/race_data"), None, False, None,
         m(fresh("race_a"), f"--config.data.data_dir={out}/race_data")),
    ]
    return [dict(zip(("fault", "argv", "setup", "limit", "env", "beside"), item))
            for item in items]


def damage_data(out: str) -> None:
    shutil.rmtree(f"{out}/bad_data", ignore_errors=True)
    shutil.copytree(f"{out}/data", f"{out}/bad_data")
    for root, _, files in os.walk(f"{out}/bad_data"):
        for name in files:
            if "train.tfrecord" in name:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    f.write(b"\xff" * 32)


def outcome(result: subprocess.CompletedProcess, workdir: str | None) -> str:
    """The error line, or for a command that worked what it left behind."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
    if result.returncode:
        return (errors or lines or ["(no output)"])[-1][:400]
    record = os.path.join(workdir or "", "run.json")
    if workdir and os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            run = json.load(f)
        return (f"ok: run.json steps {run['steps']}, start {run.get('start')!r}, resumed at "
                f"{run.get('resumed_at_step')}, mIoU {run['miou']:.4f}")
    warnings = [line for line in lines if line.startswith("W") and "differs" in line]
    return "ok" + (f": {warnings[0].split('] ', 1)[-1]}" if warnings else "") + (
        f" ({result.stdout.strip().splitlines()[-1][:200]})" if result.stdout.strip() else "")


def result_json(rows: list[dict], commit: str, versions: dict, out: str) -> dict:
    """The records in the form of ``benchmarks/results/`` (`benchmarks.docs_tables`):
    one row per fault, its exit status and outcome (the scratch folder shown as OUT)."""
    def cell(text) -> str:
        return str(text).replace(out, "OUT").replace(REPO, "REPO").replace("|", "\\|")
    return {"command": "python benchmarks/fault_qa.py --out=OUT "
                       "--json=benchmarks/results/fault_qa.json",
            "commit": commit, "versions": versions, "constraints": None,
            "machine": "CPU (JAX_PLATFORMS=cpu), the demo config at 1/16 width, 4 steps",
            "columns": ["fault", "exit status", "what happens now"],
            "rows": [[cell(r["fault"]), r["exit"], cell(r["outcome"])] for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="scratch folder (created)")
    parser.add_argument("--json", default=None,
                        help="also write the records here (benchmarks/results/fault_qa.json "
                             "is rendered into docs/reliability.md)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(f"{out}/images", exist_ok=True)
    from PIL import Image  # pylint: disable=import-outside-toplevel
    Image.new("RGB", (40, 30), (90, 120, 30)).save(f"{out}/images/a.png")
    with open(f"{out}/src.pth", "wb") as f:
        f.write(b"source weights")
    if not os.path.isfile(f"{out}/trained/run.json"):
        base = subprocess.run(main_cmd(out, f"{out}/trained"), cwd=REPO, env=env(),
                              capture_output=True, text=True, check=False)
        if base.returncode:
            sys.exit(f"error: the base run failed:\n{base.stderr[-3000:]}")
    sys.path.insert(0, REPO)
    from scaleattn import records  # pylint: disable=import-outside-toplevel
    commit, versions = records.git_commit(REPO), records.package_versions()  # what runs
    rows = []
    for item in faults(out):
        if item.get("setup"):
            item["setup"]()
        start = time.time()
        beside = item.get("beside") and subprocess.Popen(
            item["beside"], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        result = subprocess.run(item["argv"], cwd=REPO, env=dict(env(), **(item.get("env") or {})),
                                capture_output=True, text=True, timeout=600,
                                preexec_fn=limit_file_size if item.get("limit") else None)
        if beside and beside.wait(timeout=600):
            result.stderr += f"\nerror: the run beside it failed (exit {beside.returncode})"
            result.returncode = result.returncode or beside.returncode
        workdir = next((a.split("=", 1)[1] for a in item["argv"] if a.startswith("--workdir=")),
                       None)
        trains = "scaleattn.main" in item["argv"] and not any(
            a.startswith("--mode") for a in item["argv"])
        rows.append({"fault": item["fault"], "exit": result.returncode,
                     "outcome": outcome(result, workdir if trains else None),
                     "seconds": round(time.time() - start, 1)})
        print(f"| {rows[-1]['fault']} | {rows[-1]['exit']} | {rows[-1]['outcome']} |",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result_json(rows, commit, versions, out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
