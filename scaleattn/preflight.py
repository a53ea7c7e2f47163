"""``--mode=preflight``: compile a config's train and eval steps for a Cloud TPU topology
on any host (no TPU needed) and say whether the run fits, with which batch, and what
the compiler expects a step to cost.

With libtpu installed (``pip install -e '.[tpu]'``),
``jax.experimental.topologies.get_topology_desc`` describes the chips of a named
topology (``v5e:2x2``, ``v4:2x2x2``, ...) as abstract devices. The steps
``--mode=train`` would run are built from the same code (`experiment.step_functions`,
the `parallel.Layout` of ``config.parallel``, the global batch, grad accumulation, the
device-side augmentation) and lowered for those devices with abstract inputs
(`jax.ShapeDtypeStruct`: no data, no weights, nothing allocated), then compiled by
XLA's TPU compiler. The compiled program gives, per chip:

* memory (``compiled.memory_analysis()``): argument, output, temporary and
  generated-code bytes; the peak is ``arguments + outputs - aliased + temps + code``.
  An XLA:TPU compile that runs out of HBM fails with a message that gives the bytes
  it needed (`oom_bytes`); that is reported as ``fits: false``.
* cost (``compiled.cost_analysis()``): the FLOPs and bytes the program executes, and
  XLA's own ``optimal_seconds``. The step-time figure is a roofline of those
  (`roofline`): a compiler estimate, not a measurement.

``parallel.mode='pmap'`` is compiled as the equivalent `jax.shard_map` over a 1-D mesh
named `parallel.AXIS` (one program per chip on its slice of the batch, the same
collectives over the same axis name); ``'jit'`` runs on one chip of the topology;
``'sharded'`` uses `parallel.Layout.compile_step` itself on the topology's mesh.

The largest batch (`largest_batch`): memory is close to affine in the per-chip batch
(the state is fixed, activations grow with each image), so the train step is compiled
at two per-chip batches, the line through the two peaks is solved for the chip's HBM,
and the batch found is compiled to confirm it. The line is never followed more than
`MAX_GROWTH` times past the largest batch compiled so far: a small model whose line
predicts thousands of images per chip is compiled at 8x, the line refitted through that
point, up to `MAX_REFITS` times (past that the row reports the largest batch confirmed
and says it is a lower bound). A prediction that does not fit steps down one batch
unit twice, then bisects between it and the largest batch known to fit.
"""

import copy
import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaleattn import config as config_lib
from scaleattn import experiment, flops, optim, outputs, parallel
from scaleattn.models import build_model, layers

GiB = 2**30
ESTIMATE_NOTE = "compiler estimate, not a measurement"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what `jax.Device.device_kind` calls it and its per-chip figures.

    ``chip_config``: the libtpu chip configuration a slice runs in (``'megacore'``:
    v4 / v5p's two TensorCores act as one JAX device, as on Cloud TPU VMs); for a GPU,
    the XLA target description (``GpuTargetConfigProto`` text) its compiler is given.
    """
    name: str
    device_kind: str
    chip_config: str
    hbm_bytes: int
    hbm_bytes_per_s: float
    peak_bf16_flops: float
    source: str
    platform: str = "tpu"
    compiler_options: tuple = ()


# Per-chip HBM capacity, HBM bandwidth and dense bf16 peak of each Cloud TPU generation,
# from Google's Cloud TPU system-architecture pages (the "key chip specifications" tables).
CHIPS = (
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps
    Chip("v4", "TPU v4", "megacore", 32 * GiB, 1200e9, 275e12,
         "https://cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2, 819 GBps
    Chip("v5e", "TPU v5 lite", "default", 16 * 10**9, 819e9, 197e12,
         "https://cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e, 2765 GBps
    Chip("v5p", "TPU v5", "megacore", 95 * 10**9, 2765e9, 459e12,
         "https://cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM, 1640 GBps
    Chip("v6e", "TPU v6 lite", "default", 32 * 10**9, 1640e9, 918e12,
         "https://cloud.google.com/tpu/docs/v6e"),
    # https://www.nvidia.com/en-us/data-center/h100/ (SXM): 80 GB HBM3, 3.35 TB/s,
    # 989 TFLOPS dense bf16 (1,979 with sparsity). Compiled only for memory: XLA's GPU
    # compiler gives no cost analysis without a device, and no GPU time is estimated.
    # Triton GEMMs off: without a device XLA cannot tile some of them ("Couldn't find
    # output tile sizes"); the matrix products go to cuBLAS instead.
    Chip("h100", "NVIDIA H100 80GB HBM3", "h100_sxm", 80 * 10**9, 3.35e12, 989e12,
         "https://www.nvidia.com/en-us/data-center/h100/", platform="cuda",
         compiler_options=(("xla_gpu_enable_triton_gemm", False),)),
)

# XLA's description of a GPU it compiles for without one (stream_executor's
# GpuTargetConfigProto, text format): the H100 SXM's public figures (132 SMs, 1.98 GHz,
# 50 MiB L2, 228 KiB shared memory per SM, compute capability 9.0) and the bytes of
# device memory the CUDA driver reports for an 80 GB card.
GPU_TARGETS = {"h100_sxm": """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""}


class PreflightError(config_lib.ConfigError):
    """A topology or setting the pre-flight cannot compile for (one line)."""


def chip_of(topology: str) -> Chip:
    """The `Chip` of a topology name: ``'<TPU generation>:<AxB[xC]>'`` (``'v5e:4x4'``)
    or ``'<GPU>:<count>'`` (``'h100:8'``, GPUs of one host)."""
    generation, _, shape = topology.partition(":")
    for chip in CHIPS:
        pattern = r"\d+(x\d+)+" if chip.platform == "tpu" else r"[1-9]\d*"
        if chip.name == generation and re.fullmatch(pattern, shape):
            return chip
    known = ", ".join(c.name for c in CHIPS)
    raise PreflightError(f"--topology={topology!r} is not '<generation>:<shape>' with a "
                         f"generation of {known} (e.g. v5e:2x2, v4:2x2x2, v5p:2x2x1, v6e:2x2, "
                         f"h100:8)")


def topology_devices(topology: str) -> list:
    """The abstract devices of a topology: a TPU slice (needs libtpu) or GPUs (needs
    JAX's CUDA plugin, ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` of JAX's version;
    no GPU, no CUDA libraries). Nothing is allocated on them."""
    chip = chip_of(topology)
    # Off Cloud there is no metadata server to ask about the local TPU, and there is no
    # TPU to guard: libtpu's one-process-per-host lock (/tmp/libtpu_lockfile) would only
    # stop two pre-flights (or a pre-flight and any JAX process that loaded libtpu)
    # from running side by side.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
        if chip.platform == "tpu":
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                chip_config_name=chip.chip_config)
        else:
            desc = topologies.get_topology_desc(
                platform=chip.platform, topology=f"1x1x{topology.partition(':')[2]}",
                target_config=GPU_TARGETS[chip.chip_config])
    except Exception as e:  # pylint: disable=broad-except  # a plugin missing, a bad name
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if chip.platform == "tpu" and "not installed" in text:
            raise PreflightError(f"--topology={topology} needs libtpu (its TPU compiler): "
                                 f"pip install -e '.[tpu]'") from e
        if chip.platform != "tpu" and "not implemented" in text:
            version = jax.__version__
            raise PreflightError(f"--topology={topology} needs JAX's CUDA plugin (its GPU "
                                 f"compiler; no GPU needed): pip install "
                                 f"jax-cuda12-plugin=={version} jax-cuda12-pjrt=={version}, "
                                 f"and run with JAX_PLATFORMS=cpu") from e
        raise PreflightError(f"--topology={topology}: {text}") from e
    return list(desc.devices)


def library_versions() -> dict:
    """jax, jaxlib, flax, libtpu and JAX's CUDA plugin versions (None where not
    installed)."""
    import importlib.metadata as md  # pylint: disable=import-outside-toplevel
    versions = {}
    for name in ("jax", "jaxlib", "flax", "libtpu", "jax-cuda12-pjrt"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """How a config's steps are placed on a topology's devices.

    ``compile_step(fn, donate_state)`` returns the jitted step; ``state_sharding(tree)``,
    ``batch_sharding`` and ``replicated`` say where its inputs live; ``batch_shards``
    is how many equal parts the global batch is split into; ``chips`` how many
    devices the run uses.
    """
    mode: str
    mesh: Mesh
    param_sharding: str
    compile_step: Callable
    state_sharding: Callable
    batch_shards: int

    @property
    def chips(self) -> int:
        return self.mesh.devices.size

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def pmap_as_shard_map(fn: Callable, mesh: Mesh, *, donate_state: bool) -> Callable:
    """``fn(state, *args, replicas=...)`` as `jax.pmap` runs it, written as a jitted
    `jax.shard_map` over ``mesh`` (1-D, axis `parallel.AXIS`): every chip runs ``fn`` on
    a full copy of the state and its slice of the batch (leading axis), and the
    collectives of `parallel.Replicas` run over the same axis name. Outputs are the
    replicated values pmap returns once per device."""
    step = functools.partial(fn, replicas=parallel.Replicas(parallel.AXIS))
    P = PartitionSpec

    def in_specs(n_args):
        return (P(),) + (P(parallel.AXIS),) + (P(),) * (n_args - 2)

    def jitted_for(n_args):
        mapped = jax.shard_map(step, mesh=mesh, in_specs=in_specs(n_args), out_specs=P(),
                               check_vma=False)
        return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())

    class Step:  # `lower` with any number of arguments, as a jitted function offers
        @staticmethod
        def lower(*args):
            return jitted_for(len(args)).lower(*args)
    return Step()


def make_target(parallel_cfg: ml_collections.ConfigDict, devices: list) -> Target:
    """The `Target` of ``config.parallel`` on ``devices`` (a topology's)."""
    mode = parallel_cfg.mode
    config_lib.check_choice("parallel.mode", mode)
    if mode == "pmap":
        mesh = Mesh(np.asarray(devices, dtype=object), (parallel.AXIS,))
        return Target(mode, mesh, "replicated",
                      lambda fn, donate_state=True: pmap_as_shard_map(
                          fn, mesh, donate_state=donate_state),
                      lambda tree: jax.tree_util.tree_map(
                          lambda _: NamedSharding(mesh, PartitionSpec()), tree),
                      len(devices))
    if mode == "jit":
        devices = devices[:1]
    try:
        mesh = parallel.make_mesh(tuple(parallel_cfg.mesh_shape) if mode == "sharded"
                                  else (1, 1), devices)
    except ValueError as e:
        raise PreflightError(str(e)) from e
    layout = parallel.Layout("sharded", mesh, parallel_cfg.param_sharding if mode == "sharded"
                             else "replicated", int(parallel_cfg.fsdp_min_size))
    return Target(mode, mesh, layout.param_sharding, layout.compile_step,
                  layout.state_shardings, mesh.shape["data"])


# --------------------------------------------------------------------------- the steps


def for_platform(config: ml_collections.ConfigDict, chip: Chip) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the target's choices where the config says 'auto'
    (``model.dilated_conv``: `layers.DILATED_CONV_AUTO` of the chip's platform, not of
    the host that compiles)."""
    config = copy.deepcopy(config)
    platform = {"cuda": "gpu"}.get(chip.platform, chip.platform)
    config.model.dilated_conv = layers.resolve_dilated_conv(config.model.dilated_conv,
                                                            platform)
    return config


@dataclasses.dataclass
class Steps:
    """The model, the pure steps of a config and the abstract state they take."""
    model: Any
    train_fn: Callable
    eval_fn: Callable
    state_shapes: Any


def build_steps(config: ml_collections.ConfigDict, target: Target) -> Steps:
    """What `experiment.setup_run` builds, uncompiled, for ``target``'s mode."""
    model = build_model(config.model, bn_axis_name=parallel.axis_name(target.mode))
    tx, schedule = optim.create_optimizer(config.optim, config.train.steps,
                                          bn_frozen=config.model.bn_mode == "frozen")
    train_fn, eval_fn = experiment.step_functions(config, model, schedule)
    rng = jax.random.PRNGKey(config.seed)
    size = config.data.crop_size
    from scaleattn import state as state_lib  # pylint: disable=import-outside-toplevel
    shapes = jax.eval_shape(state_lib.initializer(model, tx, rng, (1, size, size, 3)))
    return Steps(model, train_fn, eval_fn, shapes)


def abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_batch_shapes(config: ml_collections.ConfigDict, global_batch: int) -> dict:
    """Shapes of the train batch the host sends: the uint8 canvas batch with
    ``data.augment_on='device'``, else cropped float32 images and int32 labels
    (`data.pipeline`)."""
    if config.data.augment_on == "device":
        canvas = config.data.canvas_size or config.data.eval_size
        return {"image": jax.ShapeDtypeStruct((global_batch, canvas, canvas, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((global_batch, canvas, canvas), jnp.uint8),
                "size": jax.ShapeDtypeStruct((global_batch, 2), jnp.int32)}
    crop = config.data.crop_size
    return {"image": jax.ShapeDtypeStruct((global_batch, crop, crop, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((global_batch, crop, crop), jnp.int32)}


def eval_batch_shapes(config: ml_collections.ConfigDict, global_batch: int) -> dict:
    """Shapes of an eval batch: images padded to ``data.eval_size``."""
    size = config.data.eval_size
    return {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((global_batch, size, size), jnp.int32)}


def oom_bytes(message: str) -> tuple[int | None, int | None]:
    """``(needed, available)`` bytes from an XLA:TPU out-of-memory compile error, else
    Nones. Two forms: ``'Used 20.51G of 15.75G hbm.'`` and ``'the total memory required
    for HLO temporaries (72.76G) exceeds available HBM (15.75G)'`` (temporaries alone:
    a lower bound of what the step needs)."""
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern in (r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm",
                    r"required for [\w ]+\(([\d.]+)([KMGT]?)\) exceeds available HBM "
                    r"\(([\d.]+)([KMGT]?)\)"):
        match = re.search(pattern, message)
        if match:
            return (int(float(match.group(1)) * unit[match.group(2)]),
                    int(float(match.group(3)) * unit[match.group(4)]))
    return None, None


def collectives(hlo_text: str) -> dict:
    """``{op: {'count', 'bytes'}}`` of the cross-chip collectives in optimised HLO text
    (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute; their
    async ``-start`` forms counted once); ``bytes`` sums the ops' result shapes."""
    sizes = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
    ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    found = {op: {"count": 0, "bytes": 0} for op in ops}
    pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(ops) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if not match:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
        if match.group(3):  # an async start returns (operands, results): count results
            shapes = shapes[len(shapes) // 2:]
        total = sum(sizes.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                    for dtype, dims in shapes)
        found[match.group(2)]["count"] += 1
        found[match.group(2)]["bytes"] += total
    return found


def roofline(flops_per_chip: float | None, bytes_per_chip: float | None,
             chip: Chip) -> tuple[float | None, str]:
    """``(seconds, basis)``: the larger of compute time at the chip's bf16 peak and HBM
    traffic time at its bandwidth (a lower bound a real step does not beat)."""
    compute = flops_per_chip / chip.peak_bf16_flops if flops_per_chip else None
    memory = bytes_per_chip / chip.hbm_bytes_per_s if bytes_per_chip else None
    if compute is None and memory is None:
        return None, "none"
    if memory is None or (compute is not None and compute >= memory):
        return compute, "compute: XLA flops / bf16 peak"
    return memory, "memory: XLA bytes accessed / HBM bandwidth"


def compile_step(jitted, args, compiler_options: tuple = ()) -> dict:
    """Lower and compile (with XLA ``compiler_options``); the memory and cost figures
    of the compiled program, or the bytes an out-of-memory compile asked for."""
    start, cpu = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*args)
    lower_s, lower_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile(dict(compiler_options) or None)
    except Exception as e:  # pylint: disable=broad-except  # XLA's RESOURCE_EXHAUSTED
        needed, available = oom_bytes(str(e))
        if needed is None:
            raise
        return {"lower_s": lower_s, "compile_s": time.perf_counter() - start,
                "lower_cpu_s": lower_cpu_s, "compile_cpu_s": time.process_time() - cpu,
                "compiled": False, "peak_bytes_per_chip": needed,
                "compiler_hbm_bytes": available}
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    row = {"lower_s": lower_s, "compile_s": compile_s, "lower_cpu_s": lower_cpu_s,
           "compile_cpu_s": compile_cpu_s, "compiled": True,
           "argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes),
           "code_bytes": int(mem.generated_code_size_in_bytes),
           "flops_per_chip": float(cost.get("flops", 0.0)) or None,
           "bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)) or None,
           "xla_optimal_seconds": (float(cost["optimal_seconds"])
                                   if "optimal_seconds" in cost else None),
           "collectives": collectives(compiled.as_text())}
    row["peak_bytes_per_chip"] = (row["argument_bytes"] + row["output_bytes"]
                                  - row["alias_bytes"] + row["temp_bytes"] + row["code_bytes"])
    return row


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass
class Preflight:
    """A config made ready to compile for one topology."""
    config: ml_collections.ConfigDict
    topology: str
    chip: Chip
    devices: list
    target: Target
    steps: Steps

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, topology: str) -> "Preflight":
        chip = chip_of(topology)
        config = for_platform(config, chip)
        devices = topology_devices(topology)
        target = make_target(config.parallel, devices)
        return cls(config, topology, chip, devices, target, build_steps(config, target))

    def runnable_batch(self, global_batch: int, key: str) -> tuple[int, str | None]:
        """``(batch, note)``: ``global_batch`` itself if it divides over the batch shards
        (and, for ``batch_size``, each shard's part into ``train.grad_accum_steps``);
        else the next batch up that does, with a note saying ``--mode=train`` would stop."""
        accum = self.config.train.grad_accum_steps if key == "batch_size" else 1
        unit = self.target.batch_shards * accum
        if global_batch % unit == 0:
            return global_batch, None
        runnable = -(-global_batch // unit) * unit
        return runnable, (f"config.{key}={global_batch} does not divide over the "
                          f"{self.target.batch_shards} batch shards of {self.topology}"
                          + (f" x {accum} micro-batches" if accum > 1 else "")
                          + f" (--mode=train would stop): compiled at {runnable} "
                          f"(--config.{key}={runnable})")

    def check_batch(self, global_batch: int, key: str) -> None:
        shards = self.target.batch_shards
        accum = self.config.train.grad_accum_steps if key == "batch_size" else 1
        if global_batch % shards or (global_batch // shards) % accum:
            raise PreflightError(
                f"config.{key}={global_batch} must divide over the {shards} batch shards of "
                f"{self.topology}" + (f" and then into train.grad_accum_steps={accum}"
                                      if accum > 1 else ""))

    def arguments(self, step: str, global_batch: int) -> tuple:
        target = self.target
        state = abstract(self.steps.state_shapes, target.state_sharding(self.steps.state_shapes))
        shapes = (train_batch_shapes if step == "train" else eval_batch_shapes)(
            self.config, global_batch)
        batch = abstract(shapes, jax.tree_util.tree_map(lambda _: target.batch_sharding,
                                                        shapes))
        if step == "eval":
            return state, batch
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=target.replicated)
        return state, batch, rng

    def compile(self, step: str, global_batch: int) -> dict:
        """One JSON row: ``step`` ('train' | 'eval') compiled at ``global_batch``."""
        key = "batch_size" if step == "train" else "eval.batch_size"
        self.check_batch(global_batch, key)
        fn = self.steps.train_fn if step == "train" else self.steps.eval_fn
        jitted = self.target.compile_step(fn, donate_state=step == "train")
        result = compile_step(jitted, self.arguments(step, global_batch),
                              self.chip.compiler_options)
        return self.row(step, global_batch, result)

    def compile_ms_flip(self) -> dict:
        """The multi-scale + flip evaluation (``predict.ms_eval_at_end``) as
        `inference.evaluate_ms_flip` runs it: `inference.scale_probs` for each scale of
        ``predict.ms_scales``, each a program on one chip (every process evaluates its
        share of ``eval.batch_size`` on its first device). The row's peak is the
        largest program's; FLOPs, bytes and compile times are summed over the scales."""
        from scaleattn import inference  # pylint: disable=import-outside-toplevel
        cfg = self.config
        hosts = len({d.process_index for d in self.devices})
        batch = max(1, cfg.eval.batch_size // hosts)
        single = jax.sharding.SingleDeviceSharding(self.devices[0])
        shapes = {"params": self.steps.state_shapes.params,
                  "batch_stats": self.steps.state_shapes.batch_stats}
        variables = abstract(shapes, jax.tree_util.tree_map(lambda _: single, shapes))
        size = cfg.data.eval_size
        images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=single)
        model = build_model(cfg.model)
        parts = []
        for scale in cfg.predict.ms_scales:
            program = type("ScaleProbs", (), {"lower": staticmethod(functools.partial(
                inference.scale_probs.lower, model=model, scale=float(scale),
                flip=bool(cfg.predict.flip)))})
            parts.append(compile_step(program, (variables, images), self.chip.compiler_options))
        total = dict(max(parts, key=lambda r: r["peak_bytes_per_chip"]))
        for key in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s", "flops_per_chip",
                    "bytes_accessed_per_chip"):
            values = [r.get(key) for r in parts]
            total[key] = sum(values) if all(v is not None for v in values) else None
        total["compiled"] = all(r["compiled"] for r in parts)
        total["xla_optimal_seconds"] = None
        return self.row("eval_ms_flip", batch * hosts, total, chips=hosts)

    def model_flops(self, step: str, global_batch: int) -> float:
        """The model FLOPs (`flops.step_flops`) of one step, all chips together
        (``'eval_ms_flip'``: one inference forward per scale, two with flip)."""
        cfg = self.config
        if step == "eval_ms_flip":
            size = (cfg.data.eval_size,) * 2
            per_image = sum(
                flops.step_flops(cfg.model, 1, layers.scaled_size(size, s)[0])["eval"]
                for s in cfg.predict.ms_scales) * (2 if cfg.predict.flip else 1)
            return float(per_image) * global_batch
        size = cfg.data.crop_size if step == "train" else cfg.data.eval_size
        per_image = flops.step_flops(cfg.model, 1, size)
        return float(per_image[step]) * global_batch

    def row(self, step: str, global_batch: int, result: dict, chips: int | None = None) -> dict:
        cfg, chip, target = self.config, self.chip, self.target
        chips = chips or target.chips
        peak = result["peak_bytes_per_chip"]
        fits = bool(result["compiled"]) and peak <= chip.hbm_bytes
        model_flops = self.model_flops(step, global_batch) / chips
        est_s, basis = roofline(result.get("flops_per_chip"),
                                result.get("bytes_accessed_per_chip"), chip)
        xla_s = result.get("xla_optimal_seconds")
        row = {
            "config": cfg.name, "topology": self.topology, "chips": chips,
            "topology_chips": len(self.devices),
            "hosts": len({d.process_index for d in self.devices}),
            "device_kind": self.devices[0].device_kind, "step": step,
            "global_batch": global_batch,
            "per_chip_batch": global_batch / (chips if step == "eval_ms_flip"
                                              else target.batch_shards),
            "grad_accum_steps": cfg.train.grad_accum_steps if step == "train" else 1,
            "image_size": cfg.data.crop_size if step == "train" else cfg.data.eval_size,
            "augment_on": cfg.data.augment_on if step == "train" else "host",
            "dtype": cfg.model.dtype, "parallel_mode": target.mode,
            "mesh_shape": dict(target.mesh.shape),
            "param_sharding": target.param_sharding,
            "dilated_conv": cfg.model.dilated_conv, "remat": bool(cfg.model.remat),
            # XLA's exec_time_optimization_effort the step was compiled with (read back)
            "exec_time_effort": float(jax.config.jax_exec_time_optimization_effort),
            "lower_s": round(result["lower_s"], 2), "compile_s": round(result["compile_s"], 2),
            # CPU seconds of this process (all threads): on a shared host, the figure
            # that other jobs do not inflate
            "lower_cpu_s": round(result["lower_cpu_s"], 2),
            "compile_cpu_s": round(result["compile_cpu_s"], 2),
            "compiled": result["compiled"],
            **{k: result.get(k) for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                          "temp_bytes", "code_bytes")},
            "peak_bytes_per_chip": peak, "hbm_bytes_per_chip": chip.hbm_bytes,
            "compiler_hbm_bytes": result.get("compiler_hbm_bytes"),
            "fits": fits, "headroom_bytes": chip.hbm_bytes - peak,
            "flops_per_chip": result.get("flops_per_chip"),
            "bytes_accessed_per_chip": result.get("bytes_accessed_per_chip"),
            "model_flops_per_chip": model_flops,
            "est_step_s": est_s, "est_basis": basis,
            "xla_optimal_s": xla_s if xla_s and xla_s > 0 else None,
            "xla_optimal_s_raw": xla_s,
            "est_img_per_s": global_batch / est_s if est_s else None,
            "est_mfu": model_flops / est_s / chip.peak_bf16_flops if est_s else None,
            "estimate": ESTIMATE_NOTE,
            "collectives": result.get("collectives"),
            "chip_source": chip.source,
            **library_versions(),
        }
        if step == "train" and est_s:
            row["train_steps"] = cfg.train.steps
            row["est_chip_hours"] = cfg.train.steps * est_s * chips / 3600
        return row


# --------------------------------------------------------------------------- largest batch


def affine_batch(points: list[tuple[int, int]], hbm: int, unit: int) -> dict:
    """The line ``peak = fixed + per_image * b`` through two ``(per-chip batch, peak
    bytes)`` points and the largest multiple of ``unit`` under ``hbm`` on it."""
    (b0, p0), (b1, p1) = sorted(points)[:1] + sorted(points)[-1:]
    per_image = (p1 - p0) / (b1 - b0)
    fixed = p0 - per_image * b0
    guess = int((hbm - fixed) // per_image) if per_image > 0 else b1
    return {"bytes_per_image": per_image, "fixed_bytes": fixed,
            "per_chip": max(0, guess - guess % unit)}


MAX_GROWTH = 8   # the line is followed at most this many times past the largest compiled batch
MAX_REFITS = 3   # ... and refitted through a new point at most this many times


def confirm_batch(compile_at: Callable[[int], dict], predicted: int, known: dict,
                  hbm: int, unit: int) -> tuple[int, bool]:
    """The largest per-chip batch (a multiple of ``unit``) that a compile confirms.

    Args:
      compile_at: compiles the train step at a per-chip batch, returns its row
        (``peak_bytes_per_chip``, ``fits``).
      predicted: the affine line's per-chip batch.
      known: ``{per-chip batch: row}`` compiled already (at least one).
      hbm: the chip's bytes; unit: the per-chip batch moves in these steps.
    Returns:
      ``(per-chip batch, lower_bound)``: 0 when not even ``unit`` fits; ``lower_bound``
      when `MAX_REFITS` ran out while the line still pointed higher.
    """
    known = dict(known)

    def fits(b: int) -> bool:
        if b not in known:
            known[b] = compile_at(b)
        return known[b]["fits"]

    target, lower_bound = predicted, False
    for refit in range(MAX_REFITS + 1):
        cap = MAX_GROWTH * max(known)
        cap -= cap % unit
        if target <= cap:
            break
        if refit == MAX_REFITS or not fits(cap):
            target, lower_bound = cap, refit == MAX_REFITS
            break
        near = max(b for b in known if b < cap)
        target = affine_batch([(near, known[near]["peak_bytes_per_chip"]),
                               (cap, known[cap]["peak_bytes_per_chip"])], hbm, unit)["per_chip"]
        target = max(target, cap)   # cap fits: the answer is at least cap
    if target >= unit and fits(target):
        return target, lower_bound
    failed, steps = target, 0
    while True:
        lo = max([b for b, row in known.items() if row["fits"]], default=0)
        steps += 1
        trial = failed - unit if steps <= 2 else lo + (failed - lo) // 2
        trial -= trial % unit
        if trial <= lo or trial < unit:
            return lo, False
        if not fits(trial):
            failed = trial


def largest_batch(candidates: list["Preflight"], first: dict, *,
                  log: Callable[[str], None] = print) -> list[dict]:
    """The largest global train batch that fits, for each candidate layout of one config
    on one topology (module docstring).

    ``candidates[0]`` is the config's own layout and ``first`` its train row. Its train
    step is compiled at a second per-chip batch (double the first if that fits, else
    half): the two peaks give the bytes per image and the fixed bytes. Every other
    candidate (another ``param_sharding``) is compiled at the first batch only: the
    activations per image are the same, only the fixed bytes (state) differ. The best
    prediction is compiled to confirm it, one step down while it does not fit.
    Returns one row per candidate: ``{'param_sharding', 'parallel_mode', 'points',
    'predicted_batch', 'largest_batch' (confirmed, the best candidate only, else None),
    ...}``.
    """
    own = candidates[0]
    unit = own.config.train.grad_accum_steps  # the per-shard batch moves in these steps
    hbm = own.chip.hbm_bytes
    a = int(first["per_chip_batch"])
    b = 2 * a if first["fits"] else max(unit, (a // 2) - (a // 2) % unit)
    if b == a:
        b = a + unit
    compiled = {(0, a): first}

    def at(index: int, per_chip: int) -> dict:
        if (index, per_chip) not in compiled:
            pre = candidates[index]
            log(f"  {pre.target.mode} / {pre.target.param_sharding}: compiling the train step "
                f"at {per_chip * pre.target.batch_shards} ({per_chip} per batch shard) ...")
            compiled[index, per_chip] = pre.compile("train", per_chip * pre.target.batch_shards)
        return compiled[index, per_chip]

    fit = affine_batch([(a, first["peak_bytes_per_chip"]),
                        (b, at(0, b)["peak_bytes_per_chip"])], hbm, unit)
    rows = []
    for index, pre in enumerate(candidates):
        fixed = (fit["fixed_bytes"] if index == 0 else
                 at(index, a)["peak_bytes_per_chip"] - fit["bytes_per_image"] * a)
        per_chip = affine_batch([(0, fixed), (1, fixed + fit["bytes_per_image"])], hbm,
                                unit)["per_chip"]
        rows.append({"parallel_mode": pre.target.mode,
                     "param_sharding": pre.target.param_sharding,
                     "batch_shards": pre.target.batch_shards,
                     "bytes_per_image": fit["bytes_per_image"], "fixed_bytes": fixed,
                     "predicted_per_chip": per_chip,
                     "predicted_batch": per_chip * pre.target.batch_shards,
                     "largest_batch": None})
    best = max(range(len(rows)), key=lambda i: (rows[i]["predicted_batch"], -i))
    per_chip, lower_bound = confirm_batch(lambda b: at(best, b), rows[best]["predicted_per_chip"],
                                          {k[1]: v for k, v in compiled.items() if k[0] == best},
                                          hbm, unit)
    rows[best]["largest_batch"] = per_chip * candidates[best].target.batch_shards
    rows[best]["largest_batch_is_lower_bound"] = lower_bound
    rows[best]["largest_batch_row"] = compiled.get((best, per_chip))
    for index, row in enumerate(rows):
        row["points"] = sorted((k[1], v["peak_bytes_per_chip"]) for k, v in compiled.items()
                               if k[0] == index)
    return rows


# --------------------------------------------------------------------------- summary


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def summary_line(row: dict) -> str:
    """One line for a compiled step."""
    est = (f"est. {row['est_step_s'] * 1e3:.1f} ms/step, {row['est_img_per_s']:.0f} img/s, "
           f"MFU {row['est_mfu']:.0%} ({ESTIMATE_NOTE}; {row['est_basis']})"
           if row.get("est_step_s") else "no compiler estimate")
    spare = row["hbm_bytes_per_chip"] - row["peak_bytes_per_chip"]
    key = "batch_size" if row["step"] == "train" else "eval.batch_size"
    verdict = (f"fits ({gib(spare)} to spare)" if row["fits"] else
               f"DOES NOT FIT (over by {gib(-spare)}: lower {key}"
               + (", raise train.grad_accum_steps or set model.remat=True"
                  if row["step"] == "train" else "") + ")")
    return (f"{row['step']:5s} batch {row['global_batch']} on {row['chips']} x "
            f"{row['device_kind']}: {verdict}, {gib(row['peak_bytes_per_chip'])} of "
            f"{gib(row['hbm_bytes_per_chip'])} per chip; compile {row['compile_s']:.0f} s "
            f"(lower {row['lower_s']:.0f} s); {est}")


def run(config: ml_collections.ConfigDict, topology: str, *, batch: str = "config",
        output: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """``--mode=preflight``: compile the train and eval steps of ``config`` for
    ``topology``, print a summary, write the rows (a JSON list) to ``output``.

    ``batch``: 'config' (``batch_size``) or 'auto' (also find the largest train batch
    that fits, `largest_batch`, for the config's param_sharding and, in the sharded
    mode, for the others). Raises `PreflightError` (one line) when the config's train
    step does not fit.
    """
    if batch not in ("config", "auto"):
        raise PreflightError(f"--preflight_batch={batch!r}: use 'config' or 'auto'")
    effort = parallel.set_compile_effort(config.parallel)
    pre = Preflight.create(config, topology)
    log(f"pre-flight of {config.name} on {topology} ({pre.target.chips} x "
        f"{pre.devices[0].device_kind}, {len({d.process_index for d in pre.devices})} "
        f"host(s)), {pre.target.mode} / {pre.target.param_sharding}, {config.model.dtype}"
        + (f", XLA exec_time_optimization_effort {effort:g}" if effort else "") + "; "
        f"every time and throughput below is a {ESTIMATE_NOTE}")
    rows = []
    for step, key in (("train", "batch_size"), ("eval", "eval.batch_size")):
        global_batch, note = pre.runnable_batch(config_lib.lookup(config, key), key)
        if note:
            log(f"note: {note}")
        rows.append(pre.compile(step, global_batch))
        rows[-1]["batch_note"] = note
        log(summary_line(rows[-1]))
    if config.predict.ms_eval_at_end:
        rows.append(pre.compile_ms_flip())
        log(summary_line(rows[-1]))
    if batch == "auto":
        rows += auto_batches(config, topology, pre, rows[0], log=log)
    if output:
        outputs.atomic_write(output, json.dumps(rows, indent=1) + "\n")
        log(f"wrote {output}")
    train = rows[0]
    if not train["fits"]:
        raise PreflightError(
            f"{config.name} does not fit {topology}: the train step at batch "
            f"{train['global_batch']} needs {gib(train['peak_bytes_per_chip'])} per chip, "
            f"a {pre.chip.name} chip has {gib(pre.chip.hbm_bytes)} HBM; lower batch_size, "
            f"raise train.grad_accum_steps, set model.remat=True, or use a larger topology")
    return rows


def auto_batches(config, topology: str, pre: Preflight, first: dict, *,
                 log: Callable[[str], None]) -> list[dict]:
    """`largest_batch` for the config's layout and the other ``param_sharding`` rules of
    the sharded mode on the same topology ('model' only where the mesh has a model axis
    larger than 1: otherwise it is 'replicated'); ``'largest_batch'`` rows."""
    candidates = [pre]
    if pre.target.mode in ("pmap", "sharded"):
        mesh = parallel.resolve_mesh_shape(tuple(config.parallel.mesh_shape), len(pre.devices))
        for rule in ("replicated", "fsdp", "model"):
            same = (rule == pre.target.param_sharding
                    or (rule == "model" and mesh[1] == 1)
                    or (rule == "replicated" and pre.target.mode == "pmap"))
            if not same:
                other = copy.deepcopy(config)
                other.parallel.mode, other.parallel.param_sharding = "sharded", rule
                candidates.append(Preflight.create(other, topology))
    log("largest batch (affine fit of memory in the per-chip batch, confirmed by a compile):")
    found = largest_batch(candidates, first, log=log)
    rows = []
    for row in found:
        rows.append({"config": config.name, "topology": topology, "step": "largest_batch",
                     "dtype": config.model.dtype, "estimate": "predicted_batch: affine fit; "
                     "largest_batch: confirmed by compiling it", **row})
        log(f"  {row['parallel_mode']} / {row['param_sharding']}: predicted "
            f"{row['predicted_batch']} ({gib(row['fixed_bytes'])} fixed + "
            f"{gib(row['bytes_per_image'])} per image)"
            + (f", confirmed {'at least ' if row.get('largest_batch_is_lower_bound') else ''}"
               f"{row['largest_batch']}" if row["largest_batch"] is not None else ""))
    best = max(found, key=lambda r: r["largest_batch"] or 0)
    log(f"largest batch: {best['largest_batch']} with parallel.mode={best['parallel_mode']}, "
        f"param_sharding={best['param_sharding']} (--config.batch_size="
        f"{best['largest_batch']})")
    return rows
