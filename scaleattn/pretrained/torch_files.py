"""PyTorch ``torch.save`` state dicts read without PyTorch, and without running the pickle.

Both containers torch writes are read:

* the zip archive (torch >= 1.6): ``<archive>/data.pkl`` plus one raw file per storage,
  ``<archive>/data/<key>`` (`read_torch_zip`);
* the legacy single stream (older files, e.g. torchvision's ``vgg16-397923af.pth``):
  magic number, protocol, system info, the pickle, then the storages
  (`read_torch_legacy`).

The pickle is read by `TorchUnpickler`, which resolves only the handful of globals a
state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
friends, the ``torch.*Storage`` types) to local stand-ins; any other global is refused
with `UnsafePickleError`, so a file cannot make the reader run code of its choosing.
Both readers return ``{name: np.ndarray}`` with each tensor's own shape and dtype.
"""

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np
from absl import logging

from scaleattn.pretrained.our_format import WeightsError


class UnsafePickleError(WeightsError):
    """A pickle that asks for a global outside the state-dict allowlist."""


# torch storage class -> element dtype (little-endian; byte order is fixed up on read).
TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: only its element dtype matters."""
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(TORCH_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A persistent id ``('storage', type, key, location, numel[, view])``, unresolved."""
    type: StorageType
    key: str
    numel: int
    view: tuple | None = None       # legacy format: (root key, offset, size) or None


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """What ``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` describes."""
    storage: StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``; the rest (requires_grad,
    backward hooks, metadata) does not matter for weights."""
    del unused
    if not isinstance(storage, StorageRef):
        raise UnsafePickleError(f"_rebuild_tensor_v2 got {type(storage).__name__} "
                                f"instead of a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                     tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    """Stand-in for ``torch._utils._rebuild_parameter(_with_state)``: the tensor."""
    del requires_grad, backward_hooks, unused
    return data


TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in TORCH_STORAGE_DTYPES},
}


class TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into `TensorRef` leaves; refuses any other global.

    ``find_class`` is where pickle gets every callable it may call (GLOBAL,
    STACK_GLOBAL, INST, OBJ, NEWOBJ, EXT); here it only hands out the local stand-ins
    of `TORCH_GLOBALS`, so a file cannot make the loader run code of its choosing.
    """

    def __init__(self, file, *, source: str, legacy: bool):
        super().__init__(file)
        self.source = source
        self.legacy = legacy

    def find_class(self, module, name):
        try:
            return TORCH_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle the global {module}.{name}: only "
                f"plain tensor state dicts are read (allowed: collections.OrderedDict, "
                f"torch._utils._rebuild_tensor_v2/_rebuild_parameter, torch.*Storage)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        fields = 5 if self.legacy else 4
        if len(pid) != fields + 1 or not isinstance(pid[1], StorageType):
            raise UnsafePickleError(f"{self.source}: malformed storage id {pid!r:.80}")
        key = pid[2].decode() if isinstance(pid[2], bytes) else str(pid[2])
        view = pid[5] if self.legacy else None
        return StorageRef(pid[1], key, int(pid[4]), None if view is None else tuple(view))


def tensor_from_storage(ref: TensorRef, data: np.ndarray, name: str, source: str) -> np.ndarray:
    """``data`` (the 1-D storage, ``[numel]``) viewed as the tensor ``ref``: an array of
    shape ``ref.size`` and ``data``'s dtype (a copy if the strides are not C order).
    Sizes, strides and the offset are checked against the storage's length."""
    size, stride = ref.size, ref.stride
    numbers = (ref.offset, *size, *stride) if isinstance(size, tuple) and isinstance(
        stride, tuple) else (None,)
    if (len(size) != len(stride) or not all(isinstance(n, int) for n in numbers)
            or min(numbers) < 0):
        raise WeightsError(f"{source}: tensor {name!r} has a malformed size/stride "
                           f"{size}/{stride}")
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise WeightsError(f"{source}: tensor {name!r} ({size}, offset {ref.offset}) reaches "
                           f"element {last} of a storage of {data.size}: truncated file?")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset:], shape=size, strides=[s * data.itemsize for s in stride],
        writeable=False)
    return view if view.flags.c_contiguous else view.copy()


def _state_dict_items(obj, source: str) -> dict:
    """The ``{name: TensorRef}`` of an unpickled object (a state dict, or a checkpoint
    holding one under 'state_dict' / 'model')."""
    if isinstance(obj, Mapping) and not all(isinstance(v, TensorRef) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                logging.info("%s: reading the state dict under %r.", source, key)
                return _state_dict_items(obj[key], source)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: holds a {type(obj).__name__}, not a state dict "
                           f"(save model.state_dict(), not the model)")
    bad = [k for k, v in obj.items() if not isinstance(v, TensorRef)]
    if bad:
        raise WeightsError(f"{source}: entry {bad[0]!r} is not a tensor; expected a plain "
                           f"state dict {{name: tensor}}")
    return dict(obj)


def _to_native(data: np.ndarray, little_endian: bool) -> np.ndarray:
    """``data`` read as little-endian, byte-swapped if the file was big-endian."""
    return data if little_endian or data.dtype.itemsize == 1 else data.byteswap()


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
    """A zip-format ``torch.save`` state dict -> ``{name: array}``, each array with its
    tensor's shape and dtype (tensors sharing a storage share its bytes)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise WeightsError(f"{path}: expected one data.pkl in the archive, "
                                   f"found {len(pkl)}")
            prefix = pkl[0][:-len("data.pkl")]
            order = prefix + "byteorder"
            little = (order not in names) or zf.read(order).strip() == b"little"
            items = _state_dict_items(
                _unpickle(io.BytesIO(zf.read(pkl[0])), path, legacy=False), path)
            storages = {}
            out = {}
            for name, ref in items.items():
                st = ref.storage
                if st.key not in storages:
                    entry = f"{prefix}data/{st.key}"
                    if entry not in names:
                        raise WeightsError(f"{path}: storage {entry!r} of tensor {name!r} "
                                           f"is missing from the archive")
                    raw = zf.read(entry)
                    need = st.numel * st.type.dtype.itemsize
                    if len(raw) < need:
                        raise WeightsError(f"{path}: storage {entry!r} of tensor {name!r} "
                                           f"has {len(raw)} bytes, needs {need}: truncated")
                    data = np.frombuffer(raw, st.type.dtype, count=st.numel)
                    storages[st.key] = _to_native(data, little)
                out[name] = tensor_from_storage(ref, storages[st.key], name, path)
            return out
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise WeightsError(f"{path}: truncated or corrupt torch zip archive ({e})") from e


def _unpickle(file, path: str, *, legacy: bool):
    """The next pickle of ``file`` read by `TorchUnpickler`; corrupt data -> WeightsError."""
    try:
        return TorchUnpickler(file, source=path, legacy=legacy).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise WeightsError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: "
                           f"{e})") from e


LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001


def read_torch_legacy(path: str) -> dict[str, np.ndarray]:
    """A legacy (pre-zip, torch < 1.6) ``torch.save`` state dict -> ``{name: array}``.

    The stream is: pickled magic number, protocol version and system info; the state
    dict's pickle; the pickled list of storage keys; then, per key in that order, the
    element count (int64) and the raw elements.
    """
    with open(path, "rb") as f:
        magic, protocol, sys_info = (_unpickle(f, path, legacy=True) for _ in range(3))
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: not a torch.save file (magic {magic!r}, protocol "
                               f"{protocol!r})")
        little = not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True)
        items = _state_dict_items(_unpickle(f, path, legacy=True), path)
        keys = _unpickle(f, path, legacy=True)
        if not isinstance(keys, list):
            raise WeightsError(f"{path}: corrupt legacy torch file (no storage key list)")
        types = {}
        for ref in items.values():
            root = ref.storage.view[0] if ref.storage.view else ref.storage.key
            types[str(root)] = ref.storage.type
        storages = {}
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key not in types:
                raise WeightsError(f"{path}: storage {key!r} is not used by any tensor")
            dtype = types[key].dtype
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{path}: truncated before storage {key!r}")
            numel = struct.unpack("<q" if little else ">q", raw)[0]
            data = f.read(numel * dtype.itemsize)
            if numel < 0 or len(data) < numel * dtype.itemsize:
                raise WeightsError(f"{path}: storage {key!r} is truncated ({len(data)} of "
                                   f"{numel * dtype.itemsize} bytes)")
            storages[key] = _to_native(np.frombuffer(data, dtype), little)
    out = {}
    for name, ref in items.items():
        st = ref.storage
        root = str(st.view[0]) if st.view else st.key
        if root not in storages:
            raise WeightsError(f"{path}: storage {root!r} of tensor {name!r} is missing: "
                               f"truncated file?")
        data = storages[root]
        if st.view:
            data = data[int(st.view[1]):int(st.view[1]) + int(st.view[2])]
        out[name] = tensor_from_storage(ref, data, name, path)
    return out

