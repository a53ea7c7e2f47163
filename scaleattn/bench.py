"""``--mode=bench``: how fast the train and eval steps run, and how well they use the chip.

The steps timed are the production ones (`experiment.setup_run` with ``parallel.mode =
'jit'`` on one device), on synthetic in-memory batches of the config's shape
(``bench.batch_size`` x ``bench.crop_size``², ``model.num_classes`` labels, the ignore
label on a few pixels): no input pipeline and no TensorFlow. With
``data.augment_on='device'`` (the default) the train step gets the uint8 canvas batch
the host would send and does its own rescale/crop/flip, which is timed with it; pass
``--config.data.augment_on=host`` to time the step alone (as a peer that augments on
the host is timed).

For every dtype of ``bench.dtypes`` (``model.dtype``; default fp32 and bf16), every
lowering of the dilated convolutions in ``bench.dilated_convs`` (``model.dilated_conv``;
default the model's own) and every batch-norm folding of ``bench.fold_frozen_bn``
(``model.fold_frozen_bn``; default the model's own):

* compile time: ``jit(...).lower(...).compile()`` wall time, train and eval step;
* step time: after ``bench.warmup`` untimed steps, the median of ``bench.steps``
  steps, each ended by ``block_until_ready``; images/s = batch / step time;
* model FLOPs (`flops.step_flops`): the convolutions and matrix products of the
  model at their true tap counts, 2 per multiply-add, one count for every lowering
  of the dilated convolutions; a train step is 3 forward passes, eval one;
* executed FLOPs: XLA's cost analysis of the compiled step (``compiled.cost_analysis()
  ['flops']``), what this lowering on this backend computes (e.g. space-to-batch's
  padded sub-images);
* MFU = model FLOPs / step time / the device's peak (`PEAK_FLOPS`: bf16 dense, used
  for fp32 runs too; unknown devices such as CPUs have none, MFU is n/a);
* memory: the device's peak bytes in use (``device.memory_stats()``, cumulative
  over the process; n/a on CPU) and XLA's own estimate for the compiled step
  (arguments + outputs + temporaries - aliased).

With ``bench.profile_dir``, ``bench.steps`` more train steps run under
``jax.profiler.trace`` after the timed ones (the tracer's overhead stays out of the
times) and `op_time_summary` reads the trace back: the ops (on a GPU/TPU its device
ops, on a CPU the XLA thunks) that took the most time per step, grouped by name.

Results go to stdout as a table and to a JSON file.
"""

import collections
import copy
import glob
import json
import os
import re
import statistics
import time

import jax
import numpy as np
from absl import logging

from scaleattn import config as config_lib
from scaleattn import flops as flops_lib
from scaleattn import experiment, outputs
from scaleattn.models import layers

# Dense bf16 peak FLOP/s by device kind (lower-case substring of `device_kind`, first
# match wins: 'tpu v5 lite' (v5e) before 'tpu v5' (v5p)).
PEAK_FLOPS = (
    ("h100", 989e12),
    ("h200", 989e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
)


# ------------------------------------------------------------------ arithmetic ---


def peak_flops(device_kind: str) -> float | None:
    """The bf16 dense peak of a device kind (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    kind = device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


def compiled_flops(compiled) -> float | None:
    """Executed FLOPs of one call of a compiled XLA computation (its cost analysis), or
    None."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / peak`` (None if either is unknown);
    ``flops`` are the model FLOPs (`flops.step_flops`)."""
    if flops is None or peak is None or seconds <= 0:
        return None
    return flops / seconds / peak


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's memory estimate of a compiled step: arguments + outputs + temps - aliases."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def convolution_windows(hlo_text: str) -> dict:
    """What the compiled step's convolutions look like (optimised HLO text in).

    ``{'count': n, 'rhs_dilated': k, 'windows': {window spec: count}}``: convolutions
    (``convolution`` ops and cuDNN custom calls) and how many still carry a kernel
    dilation (``rhs_dilate``). A dilated conv that XLA lowered by zero-padding its kernel
    shows up as a large ``size=`` window without ``rhs_dilate`` (docs/design.md, "Dilated convolutions on accelerators").
    """
    windows = {}
    for line in hlo_text.splitlines():
        if "window={" not in line or not ("convolution(" in line or "custom-call(" in line):
            continue
        spec = re.search(r"window=\{([^}]*)\}", line).group(1)
        spec = re.sub(r"\s*pad=\S+", "", spec)
        windows[spec] = windows.get(spec, 0) + 1
    return {"count": sum(windows.values()),
            "rhs_dilated": sum(n for spec, n in windows.items() if "rhs_dilate" in spec),
            "windows": dict(sorted(windows.items(), key=lambda kv: -kv[1]))}


def device_peak_memory(device) -> int | None:
    """Peak bytes in use on ``device`` so far (None where not reported, e.g. CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ------------------------------------------------------------------ the timing ---


def synthetic_batch(batch_size: int, size: int, num_classes: int, seed: int = 0,
                    ignore_label: int = config_lib.VOC_IGNORE_LABEL) -> dict:
    """``image float32 [B, size, size, 3]`` ~ N(0, 1), ``label int32 [B, size, size]``
    uniform over the classes with an ``ignore_label`` border of 2 pixels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, (batch_size, size, size), dtype=np.int32)
    label[:, :2], label[:, -2:], label[:, :, :2], label[:, :, -2:] = (ignore_label,) * 4
    image = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
    return {"image": image, "label": label}


def synthetic_canvas_batch(batch_size: int, canvas: int, num_classes: int, seed: int = 0,
                           ignore_label: int = config_lib.VOC_IGNORE_LABEL) -> dict:
    """What the host sends with ``data.augment_on='device'``: ``image uint8
    [B, canvas, canvas, 3]``, ``label uint8 [B, canvas, canvas]`` (as `synthetic_batch`)
    and ``size int32 [B, 2]``, every image filling its canvas."""
    batch = synthetic_batch(batch_size, canvas, num_classes, seed, ignore_label)
    image = np.clip(batch["image"] * 60 + 120, 0, 255).astype(np.uint8)
    return {"image": image, "label": batch["label"].astype(np.uint8),
            "size": np.full((batch_size, 2), canvas, np.int32)}


def time_calls(call, *, steps: int, warmup: int) -> list[float]:
    """Wall times (s) of ``steps`` calls of ``call()`` after ``warmup`` untimed ones;
    each call's result is waited for (``block_until_ready``) inside its time."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def op_time_summary(trace_dir: str, calls: int, top: int = 12) -> list[dict]:
    """The ops that took the time in a ``jax.profiler.trace`` written to ``trace_dir``.

    Reads the newest ``*.xplane.pb`` under ``trace_dir`` with
    ``jax.profiler.ProfileData``. Takes the device planes' ``XLA Ops`` lines (GPU/TPU;
    their stream lines if there are none) or, without a device plane, the host's XLA
    thunk events (CPU), leaving out Python frames and executor bookkeeping. Events are
    grouped by name with a trailing instance number removed (``fusion.12`` ->
    ``fusion``). Returns up to ``top`` rows ``{'op', 'ms_per_call', 'share'}``, biggest
    first; ``ms_per_call`` divides by the ``calls`` traced, ``share`` is of all grouped
    time. Empty if no trace is found.
    """
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        return []
    planes = list(ProfileData.from_file(paths[-1]).planes)
    device_planes = [p for p in planes if p.name.startswith("/device:")]
    events = []
    for plane in device_planes:
        lines = list(plane.lines)
        chosen = ([ln for ln in lines if ln.name == "XLA Ops"]
                  or [ln for ln in lines if ln.name.startswith("Stream")])
        events += [ev for ln in chosen for ev in ln.events]
    if not device_planes:
        skip = ("$", "ThunkExecutor", "PjitFunction", "CommonPjRt", "ParseArguments",
                "end: ")
        for plane in planes:
            if plane.name.startswith("/host:"):
                events += [ev for ln in plane.lines for ev in ln.events
                           if not ev.name.startswith(skip)]
    totals = collections.Counter()
    for ev in events:
        totals[re.sub(r"[._]\d+$", "", ev.name)] += ev.duration_ns
    grand = sum(totals.values())
    return [{"op": name, "ms_per_call": ns / 1e6 / max(calls, 1), "share": ns / grand}
            for name, ns in totals.most_common(top)]


def bench_config(config, dtype: str, dilated_conv: str | None = None,
                 fold_bn: bool | None = None):
    """A copy of ``config`` for timing ``dtype`` on one device (jit)."""
    c = copy.deepcopy(config)
    c.model.dtype = dtype
    if dilated_conv:
        c.model.dilated_conv = dilated_conv
    if fold_bn is not None:
        c.model.fold_frozen_bn = fold_bn
    c.parallel.mode = "jit"
    c.batch_size = c.bench.batch_size or c.batch_size
    c.data.crop_size = c.bench.crop_size or c.data.crop_size
    return c


def compile_timed(jitted, *args):
    """``(compiled, seconds)`` of lowering and compiling ``jitted`` for ``args``."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def benchmark_dtype(config, dtype: str, dilated_conv: str | None = None,
                    fold_bn: bool | None = None) -> dict:
    """Compile and time the train and eval steps of ``config`` in ``dtype`` with its
    dilated convs lowered as ``dilated_conv`` and ``model.fold_frozen_bn = fold_bn``
    (None: the config's) (one row)."""
    cfg = bench_config(config, dtype, dilated_conv, fold_bn)
    lowering = layers.resolve_dilated_conv(cfg.model.dilated_conv)  # 'auto': this platform's
    run = experiment.setup_run(cfg)
    device = jax.local_devices()[0]
    rng = jax.random.PRNGKey(cfg.seed)
    state = jax.device_put(experiment.initial_state(run, rng, pretrained_start=False), device)
    batch = jax.device_put(synthetic_batch(cfg.batch_size, cfg.data.crop_size,
                                           cfg.model.num_classes, cfg.seed,
                                           cfg.loss.ignore_label), device)
    # With augmentation on the device the train step starts from the canvas batch the host
    # sends and crops it itself: that work is part of the step and is timed with it.
    train_batch = batch if cfg.data.augment_on != "device" else jax.device_put(
        synthetic_canvas_batch(cfg.batch_size, cfg.data.canvas_size or cfg.data.eval_size,
                               cfg.model.num_classes, cfg.seed, cfg.loss.ignore_label), device)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))

    eval_compiled, eval_compile_s = compile_timed(run.eval_step, state, batch)
    train_compiled, train_compile_s = compile_timed(run.train_step, state, train_batch, rng)

    def eval_call():
        return eval_compiled(state, batch)

    eval_times = time_calls(eval_call, steps=cfg.bench.steps, warmup=cfg.bench.warmup)

    def train_call():  # the state is donated: thread it through
        nonlocal state
        state, step_metrics = train_compiled(state, train_batch, rng)
        return step_metrics

    jax.block_until_ready(train_call())  # the first step may allocate
    train_times = time_calls(train_call, steps=cfg.bench.steps, warmup=cfg.bench.warmup)
    profile = None
    if cfg.bench.profile_dir:  # after the timing: a tracer's overhead stays out of it
        trace_dir = os.path.join(cfg.bench.profile_dir, f"{dtype}_{lowering}"
                                 f"{'' if cfg.model.fold_frozen_bn else '_unfolded'}")
        with jax.profiler.trace(trace_dir):
            time_calls(train_call, steps=cfg.bench.steps, warmup=0)
        profile = op_time_summary(trace_dir, cfg.bench.steps)

    peak = peak_flops(device.device_kind)
    train_s, eval_s = statistics.median(train_times), statistics.median(eval_times)
    train_flops, eval_flops = compiled_flops(train_compiled), compiled_flops(eval_compiled)
    model_flops = flops_lib.step_flops(cfg.model, cfg.batch_size, cfg.data.crop_size)
    return {
        "dtype": dtype,
        "dilated_conv": lowering,
        "fold_frozen_bn": cfg.model.fold_frozen_bn,
        "num_params": int(num_params),
        "compile_train_s": train_compile_s,
        "compile_eval_s": eval_compile_s,
        "train_step_s": train_s,
        "train_step_s_min": min(train_times),
        "eval_step_s": eval_s,
        "train_images_per_s": cfg.batch_size / train_s,
        "eval_images_per_s": cfg.batch_size / eval_s,
        # model FLOPs (the MFU's numerator) and XLA's executed FLOPs ("train_flops",
        # "eval_flops": the keys older reports have, with the same meaning)
        "train_model_flops": model_flops["train"],
        "eval_model_flops": model_flops["eval"],
        "train_flops": train_flops,
        "eval_flops": eval_flops,
        "train_tflops_per_s": model_flops["train"] / train_s / 1e12,
        "train_mfu": mfu(model_flops["train"], train_s, peak),
        "eval_mfu": mfu(model_flops["eval"], eval_s, peak),
        "train_executed_mfu": mfu(train_flops, train_s, peak),
        "train_step_memory_bytes": compiled_memory_bytes(train_compiled),
        "peak_memory_bytes": device_peak_memory(device),
        "train_convolutions": convolution_windows(train_compiled.as_text()),
        "train_profile": profile,
    }


def benchmark(config, on_row=None) -> dict:
    """All dtypes of ``config.bench.dtypes``: ``{'setup': {...}, 'results': [rows],
    'complete': bool}``. ``on_row(report)``, if given, is called after every row with
    the report so far (``complete`` False until the last row)."""
    dtypes = config_lib.comma_list(config.bench.dtypes)
    device = jax.local_devices()[0]
    cfg = bench_config(config, dtypes[0] if dtypes else "float32")
    setup = {
        "config": config.name, "device": device.device_kind, "platform": device.platform,
        "host_cores": os.cpu_count(), "jax": jax.__version__,
        "cpus_allowed": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
        "peak_flops": peak_flops(device.device_kind),
        "batch_size": cfg.batch_size, "crop_size": cfg.data.crop_size,
        "backbone": cfg.model.backbone, "head": cfg.model.head,
        "width": cfg.model.width, "depth": list(cfg.model.depth),
        "scales": list(cfg.model.scales), "merge": cfg.model.merge,
        "num_classes": cfg.model.num_classes, "remat": cfg.model.remat,
        "bn_mode": cfg.model.bn_mode, "fold_frozen_bn": cfg.model.fold_frozen_bn,
        "augment_on": cfg.data.augment_on,
        "steps": cfg.bench.steps, "warmup": cfg.bench.warmup,
    }
    impls = config_lib.comma_list(config.bench.dilated_convs)
    folds = [f == "true" for f in config_lib.comma_list(config.bench.fold_frozen_bn)]
    rows = [(dtype, impl, fold) for dtype in dtypes for impl in impls or [None]
            for fold in folds or [None]]
    report = {"setup": setup, "results": [], "complete": False}
    for i, (dtype, impl, fold) in enumerate(rows):
        logging.info("Benchmarking %s in %s, dilated convs %s, fold_frozen_bn %s ...",
                     config.name, dtype, impl or config.model.dilated_conv,
                     config.model.fold_frozen_bn if fold is None else fold)
        report["results"].append(benchmark_dtype(config, dtype, impl, fold))
        report["complete"] = i + 1 == len(rows)
        if on_row is not None:
            on_row(report)
    report["complete"] = True
    return report


# ------------------------------------------------------------------- reporting ---


def fmt(value, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{suffix}"


def table(report: dict) -> str:
    """The results as a Markdown table (one row per dtype) with a one-line header."""
    s = report["setup"]
    lines = [f"{s['config']}: {s['backbone']}/{s['head']} width {s['width']} scales "
             f"{s['scales']} ({s['merge']}), batch {s['batch_size']} x {s['crop_size']}², "
             f"on {s['device']} ({s['platform']}, {s['cpus_allowed']} of {s['host_cores']} "
             f"host cores), jax {s['jax']}",
             "",
             "| dtype | dilated convs | BN folded | compile train / eval (s) | train step (ms) "
             "| train img/s | eval step (ms) | eval img/s | train GFLOP/step (model) "
             "| MFU train | MFU eval | executed train GFLOP/step (XLA) "
             "| step memory (MiB) | peak memory (MiB) |",
             "|" + "---|" * 14]
    for r in report["results"]:
        lines.append("| " + " | ".join([
            r["dtype"], r.get("dilated_conv", "native"),
            {True: "yes", False: "no"}.get(r.get("fold_frozen_bn"), "n/a"),
            f"{r['compile_train_s']:.1f} / {r['compile_eval_s']:.1f}",
            fmt(r["train_step_s"], 1e3, 1), fmt(r["train_images_per_s"], 1, 2),
            fmt(r["eval_step_s"], 1e3, 1), fmt(r["eval_images_per_s"], 1, 2),
            fmt(r.get("train_model_flops"), 1e-9, 2), fmt(r["train_mfu"], 100, 1, "%"),
            fmt(r["eval_mfu"], 100, 1, "%"), fmt(r["train_flops"], 1e-9, 2),
            fmt(r["train_step_memory_bytes"], 2**-20, 1),
            fmt(r["peak_memory_bytes"], 2**-20, 1)]) + " |")
    for r in report["results"]:
        if r.get("train_profile"):
            lines += ["", f"Train step, {r['dtype']}, dilated convs "
                      f"{r.get('dilated_conv', 'native')}: where the time went (profiler)", "",
                      "| op | ms / step | share |", "|---|---|---|"]
            lines += [f"| {p['op']} | {p['ms_per_call']:.2f} | {100 * p['share']:.1f}% |"
                      for p in r["train_profile"]]
    return "\n".join(lines) + "\n"


def main(config, output: str) -> dict:
    """Runs `benchmark`, prints the table and writes the JSON to ``output``, rewritten
    after every row (each version whole, ``complete`` false until the last row): a run
    stopped by a time limit keeps the rows it finished."""
    output = os.path.abspath(os.path.expanduser(output))
    os.makedirs(os.path.dirname(output), exist_ok=True)

    def write(report):
        outputs.atomic_write(output, json.dumps(report, indent=1))  # never a partial file
        logging.info("Wrote %s (%d rows%s)", output, len(report["results"]),
                     "" if report["complete"] else ", more to come")

    report = benchmark(config, on_row=write)
    print(table(report), flush=True)
    return report
