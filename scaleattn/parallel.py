"""How the pure train/eval steps are spread over devices and processes.

``parallel.mode`` (the same pure step functions run in all three):

* ``'jit'``: plain `jax.jit` on one device; the reference the others must match.
  Single-process only.
* ``'pmap'``: one replica of the state per local device; a process's batch
  ``[b, ...]`` is laid out as ``[local_devices, b / local_devices, ...]``; gradients
  are summed and batch-norm statistics averaged over the pmap axis `AXIS` (which
  spans every device of every process in a multi-host run).
* ``'sharded'``: `jax.jit` on global arrays laid out with `NamedSharding` on a
  ``Mesh(devices.reshape(data, model), ('data', 'model'))`` (``parallel.mesh_shape``).
  The batch is split over ``'data'``; the step sees the global batch
  (``axis_name=None``), so the loss normalisation and batch-norm statistics are
  global without any collective in the model code. ``parallel.param_sharding``
  places the parameters, optimiser state and batch-norm statistics:

  - ``'replicated'``: a full copy on every device (data parallel);
  - ``'fsdp'``: every array of at least ``parallel.fsdp_min_size`` elements is split
    over ``'data'`` along its largest dimension that ``data`` divides (ZeRO-3 /
    FSDP style; XLA gathers the weights where a layer needs them);
  - ``'model'``: convolution kernels (``[kh, kw, in, out]``) are split over
    ``'model'`` on their output channels (tensor parallel); the rest is replicated.

Everything the training loop needs from this module goes through a `Layout`
(`make_layout(config.parallel)`): compile the steps, put the state / a batch / the
RNG where the steps expect them, and get a host-addressable copy back. The pure
step functions never ask which mode they run in: they combine values across
replicas through the `Replicas` the layout hands them (a no-op outside pmap).

Multi-host: `initialize_distributed` starts `jax.distributed`; each process then
feeds its own part of the global batch (``train_batches(process_index=...)``):
`Layout.put_batch` turns it into a global array
(`jax.make_array_from_process_local_data`) in the sharded mode, and ``pmap``
collectives span all processes by themselves.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaleattn import config as config_lib

AXIS = "batch"
MESH_AXES = ("data", "model")


def axis_name(mode: str) -> str | None:
    """The collective axis the step functions see in ``mode`` (``None`` outside pmap)."""
    config_lib.check_choice("parallel.mode", mode)
    return AXIS if mode == "pmap" else None


@dataclasses.dataclass(frozen=True)
class Replicas:
    """How a pure step combines values over the replicas that each hold part of a batch.

    Under pmap every device runs the step on its slice, so sums (gradients, pixel
    counts, confusion matrices) are ``psum``-ed over ``axis_name`` and each device
    draws its own random numbers. Under jit (one device, or global sharded arrays)
    there is one replica and every method is the identity: the step code calls them
    unconditionally and never asks which mode it runs in.
    """
    axis_name: str | None = None

    def sum(self, tree):
        """``tree`` summed over the replicas (leaf-wise)."""
        return tree if self.axis_name is None else jax.lax.psum(tree, self.axis_name)

    def mean(self, tree):
        """``tree`` averaged over the replicas (leaf-wise)."""
        return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)

    def index(self) -> jax.Array:
        """This replica's position along the replicas (0 with a single replica)."""
        if self.axis_name is None:
            return jnp.zeros((), jnp.int32)
        return jax.lax.axis_index(self.axis_name)

    def fold_in(self, key: jax.Array) -> jax.Array:
        """``key`` made distinct per replica (unchanged with a single replica)."""
        if self.axis_name is None:
            return key
        return jax.random.fold_in(key, jax.lax.axis_index(self.axis_name))


SINGLE = Replicas()


# --------------------------------------------------------------------------- mesh


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
    """``(data, model)`` with one ``-1`` filled in so that ``data * model == num_devices``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"parallel.mesh_shape={shape} must be (data, model), positive, "
                         f"at most one -1 (= the remaining devices)")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(f"parallel.mesh_shape={shape} does not fit {num_devices} devices")
    data, model = (num_devices // known if s == -1 else s for s in shape)
    if data * model != num_devices:
        raise ValueError(f"parallel.mesh_shape={shape} has {data * model} devices, "
                         f"there are {num_devices}")
    return data, model


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh over ``devices`` (default: all devices of all processes).

    ``jax.devices()`` lists devices process by process, so a ``data`` row of the
    mesh never spans two processes as long as ``model`` divides the local device
    count (checked by `make_layout` in multi-process runs). Built with `Mesh`
    directly (not `jax.make_mesh`, whose axes are Explicit in recent JAX).
    """
    devices = list(jax.devices() if devices is None else devices)
    data, model = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), MESH_AXES)


def param_spec(shape: Sequence[int], rule: str, mesh_sizes: dict[str, int],
               min_size: int = 0) -> PartitionSpec:
    """Where one parameter-like array of ``shape`` lives under ``rule``.

    * ``'replicated'`` (or fewer than ``min_size`` elements): ``P()``.
    * ``'fsdp'``: ``'data'`` on the largest dimension ``mesh_sizes['data']`` divides
      (the first of equal ones), e.g. ``[3, 3, 64, 128]`` on 4 -> ``P(None, None, None, 'data')``.
    * ``'model'``: 4-D convolution kernels ``[kh, kw, in, out]`` whose ``out`` divides
      by ``mesh_sizes['model']`` -> ``P(None, None, None, 'model')``.
    """
    config_lib.check_choice("parallel.param_sharding", rule)
    shape = tuple(shape)
    if rule == "replicated" or not shape or math.prod(shape) < min_size:
        return PartitionSpec()
    if rule == "fsdp":
        n = mesh_sizes["data"]
        candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
        if not candidates:
            return PartitionSpec()
        dim = max(candidates, key=lambda d: (shape[d], -d))
        return PartitionSpec(*(["data" if d == dim else None for d in range(len(shape))]))
    if len(shape) == 4 and shape[-1] % mesh_sizes["model"] == 0:
        return PartitionSpec(None, None, None, "model")
    return PartitionSpec()


# --------------------------------------------------------------------------- layout


def _host_array(x) -> np.ndarray:
    """A numpy copy of a fully addressable leaf, in JAX's canonical dtype (no int64)."""
    x = np.asarray(x)
    return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def _addressable(x):
    """``x`` itself if this process can read all of it, else a host copy of its value.

    A fully replicated global array is read from the local copy (no communication);
    an array split across processes is all-gathered, which every process must call.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if x.is_fully_replicated:
        return x.addressable_data(0)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(x, tiled=True)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the state and the batches of one run live, and how its steps are compiled.

    Attributes:
      mode: ``'jit' | 'pmap' | 'sharded'``.
      mesh: the ``('data', 'model')`` mesh (sharded mode only).
      param_sharding: ``'replicated' | 'fsdp' | 'model'`` (sharded mode only).
      min_shard_size: arrays smaller than this stay replicated under ``'fsdp'`` /
        ``'model'``.
    """
    mode: str
    mesh: Mesh | None = None
    param_sharding: str = "replicated"
    min_shard_size: int = 0

    def __post_init__(self):
        axis_name(self.mode)  # validates the mode
        if self.mode == "sharded" and self.mesh is None:
            raise ValueError("the sharded mode needs a mesh")

    @property
    def axis_name(self) -> str | None:
        """The pmap axis (models synchronise trained batch norm over it), else ``None``."""
        return axis_name(self.mode)

    @property
    def replicas(self) -> Replicas:
        return Replicas(self.axis_name)

    @property
    def num_batch_shards(self) -> int:
        """Into how many equal parts the global batch is split (over all processes)."""
        if self.mode == "pmap":
            return jax.device_count()
        if self.mode == "sharded":
            return self.mesh.shape["data"]
        return 1

    def describe(self) -> str:
        if self.mode == "sharded":
            data, model = self.mesh.shape["data"], self.mesh.shape["model"]
            return f"sharded on mesh data={data} x model={model}, {self.param_sharding} params"
        return f"{self.mode} over {jax.local_device_count() if self.mode == 'pmap' else 1} device(s)"

    # -------------------------------------------------------------- shardings

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) dimension over ``'data'``, the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def state_shardings(self, tree):
        """A `NamedSharding` per leaf of a state-like ``tree`` (arrays or shape structs)."""
        sizes = dict(self.mesh.shape)
        return jax.tree_util.tree_map(
            lambda x: NamedSharding(self.mesh, param_spec(np.shape(x), self.param_sharding,
                                                          sizes, self.min_shard_size)), tree)

    # -------------------------------------------------------------- compiling

    def compile_step(self, fn: Callable, *, donate_state: bool = True) -> Callable:
        """``fn(state, *args, replicas=...)`` compiled for this layout.

        With ``donate_state`` the step returns ``(new_state, aux)``: the input state's
        buffers are donated, and in the sharded mode the new state is constrained to
        the layout of `state_shardings` (so FSDP / model-parallel shardings persist
        from step to step instead of being left to the compiler).
        """
        step = functools.partial(fn, replicas=self.replicas)
        donate = (0,) if donate_state else ()
        if self.mode == "pmap":
            return jax.pmap(step, axis_name=AXIS, donate_argnums=donate)
        if self.mode == "jit" or not donate_state:
            return jax.jit(step, donate_argnums=donate)

        def constrained(state, *args):
            new_state, aux = step(state, *args)
            new_state = jax.lax.with_sharding_constraint(
                new_state, self.state_shardings(new_state))
            return new_state, aux
        return jax.jit(constrained, donate_argnums=donate)

    # -------------------------------------------------------------- creating

    def init_state(self, init: Callable[[], Any]):
        """The state ``init()`` builds, created where it will live.

        sharded: ``init`` is compiled with ``out_shardings`` = `state_shardings`, so
        every device computes only its own shards and no host ever holds the full
        parameters (FSDP). jit / pmap: one compiled call on the default device, to be
        replicated by `put_state`. Either result is accepted by `put_state` as is.
        """
        if self.mode != "sharded":
            return jax.jit(init)()
        return jax.jit(init, out_shardings=self.state_shardings(jax.eval_shape(init)))()

    def abstract_state(self, init: Callable[[], Any]):
        """Shapes, dtypes (and, sharded, the shardings) of ``init()``, nothing computed:
        the template a checkpoint is restored into (sharded: each process reads its
        shards straight into place)."""
        shapes = jax.eval_shape(init)
        if self.mode != "sharded":  # one copy on this process's first device (put_state
            # then replicates it); without a sharding a multi-process restore would
            # build global arrays no single process can read whole
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), shapes)
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
            self.state_shardings(shapes))

    # -------------------------------------------------------------- placing

    @functools.cached_property
    def local_device_sharding(self) -> NamedSharding:
        """pmap: the leading axis over this process's devices, one slice each."""
        return NamedSharding(Mesh(np.array(jax.local_devices()), ("local",)),
                             PartitionSpec("local"))

    def put_state(self, tree):
        """A host (or single-device) pytree placed where the steps expect the state.

        pmap: one copy per local device. sharded: global arrays laid out by
        `state_shardings`, built from this process's (identical) full copy; leaves
        already laid out that way are kept as they are.
        """
        if self.mode == "pmap":
            return flax.jax_utils.replicate(tree)
        if self.mode == "jit":
            return jax.device_put(tree)

        def place(x, sharding):
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            value = _host_array(x)
            return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
        return jax.tree_util.tree_map(place, tree, self.state_shardings(tree))

    def put_replicated(self, x):
        """The same value (e.g. the RNG key) on every device the step runs on."""
        if self.mode == "sharded":
            value = _host_array(x)
            return jax.make_array_from_callback(value.shape, self.replicated(),
                                                lambda i: value[i])
        return self.put_state(x)

    def put_batch(self, batch: dict) -> dict:
        """This process's batch ``[b, ...]`` on the step's device(s), as its input.

        jit: on the default device. pmap: ``[local_devices, b / local_devices, ...]``,
        one slice per local device. sharded: a global array ``[b * processes, ...]``
        split over ``'data'``. The copies are asynchronous: putting the next batch
        while a step runs overlaps the transfer with the computation (`loop.prefetch`).
        """
        if self.mode == "jit":
            return jax.device_put(batch)
        if self.mode == "pmap":
            sharding = self.local_device_sharding
            n = sharding.num_devices

            def split(x):
                if x.shape[0] % n:
                    raise ValueError(f"the local batch ({x.shape[0]}) must divide evenly over "
                                     f"{n} local devices: change batch_size")
                return jax.device_put(np.reshape(x, (n, x.shape[0] // n) + x.shape[1:]),
                                      sharding)
            return jax.tree_util.tree_map(split, batch)
        sharding = self.batch_sharding()
        data = self.mesh.shape["data"]

        def make_global(x):
            if (x.shape[0] * jax.process_count()) % data:
                raise ValueError(f"the global batch ({x.shape[0] * jax.process_count()}) must "
                                 f"divide over the mesh's data axis ({data}): change "
                                 f"batch_size or parallel.mesh_shape")
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.tree_util.tree_map(make_global, batch)

    # -------------------------------------------------------------- reading back

    def saveable(self, device_state):
        """What is handed to Orbax to save: numpy copies (pmap / jit; process 0 writes)
        or, sharded, an on-device copy of the global arrays (each process writes its
        shards). The copy matters: the next step donates ``device_state``'s buffers
        while the asynchronous save may still be reading them."""
        if self.mode != "sharded":
            return jax.device_get(self.host(device_state))
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, device_state)
        return jax.device_put(device_state, shardings, may_alias=False)  # a copy, same layout

    def host(self, tree):
        """One copy of a device pytree that this process can read (``jax.device_get`` it).

        pmap: the first replica. sharded: replicated arrays from the local copy,
        arrays split across processes all-gathered (a collective: every process must
        call this together).
        """
        if self.mode == "pmap":
            return flax.jax_utils.unreplicate(tree)
        if self.mode == "sharded":
            return jax.tree_util.tree_map(_addressable, tree)
        return tree


def make_layout(cfg) -> Layout:
    """The `Layout` of ``config.parallel`` on this process's view of the devices."""
    mode = cfg.mode
    if mode == "jit" and jax.process_count() > 1:
        raise ValueError(f"parallel.mode='jit' runs on one device of one process; with "
                         f"{jax.process_count()} processes use 'pmap' or 'sharded'")
    if mode != "sharded":
        if cfg.param_sharding != "replicated":
            raise ValueError(f"parallel.param_sharding={cfg.param_sharding!r} needs "
                             f"parallel.mode='sharded'")
        return Layout(mode)
    mesh = make_mesh(tuple(cfg.mesh_shape))
    model = mesh.shape["model"]
    if jax.process_count() > 1 and jax.local_device_count() % model:
        raise ValueError(f"parallel.mesh_shape={tuple(cfg.mesh_shape)}: the model axis ({model})"
                         f" must divide the {jax.local_device_count()} devices of each process, "
                         f"so that each process feeds whole rows of the data axis")
    return Layout(mode, mesh, cfg.param_sharding, int(cfg.fsdp_min_size))


def set_compile_effort(cfg) -> float:
    """Sets XLA's ``exec_time_optimization_effort`` for every program this process
    compiles from now on (train, eval, augmentation, pre-flight) to
    ``cfg.exec_time_effort`` (``config.parallel``, -1..1; 0 is XLA's default) and
    returns it. Lower values trade step time and memory for compile time
    (docs/preflight.md, "Compile time")."""
    effort = float(cfg.exec_time_effort)
    if not hasattr(jax.config, "jax_exec_time_optimization_effort"):  # JAX 0.11 dropped it
        if effort == 0.0:
            return effort  # XLA's default: nothing to set
        raise config_lib.ConfigError(
            f"config.parallel.exec_time_effort={effort:g} needs JAX's "
            f"jax_exec_time_optimization_effort option, which jax {jax.__version__} does not "
            f"have: set it 0 (or use the JAX of constraints.txt)")
    jax.config.update("jax_exec_time_optimization_effort", effort)
    return effort


# --------------------------------------------------------------------------- processes


def slurm_step_tasks(env=None) -> int:
    """Tasks of the current ``srun`` job step (1 outside SLURM or in the batch script)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, auto: bool = False) -> bool:
    """Starts `jax.distributed` for a multi-process run; returns whether it did.

    * Any of ``coordinator_address`` / ``num_processes`` / ``process_id`` given:
      ``jax.distributed.initialize`` with them (JAX fills in the others from the
      environment where it can).
    * ``auto`` (``--distributed``) or an ``srun`` step of more than one task:
      ``jax.distributed.initialize()`` with no arguments, which finds the coordinator,
      process count and index on Cloud TPU VMs (metadata server), SLURM, Open MPI
      and Kubernetes.
    * Otherwise nothing: a single-process run.

    Must run before anything touches a JAX device.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        jax.distributed.initialize(*explicit)
    elif auto or slurm_step_tasks() > 1:
        jax.distributed.initialize()
    else:
        return False
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True
