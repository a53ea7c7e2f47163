"""Weight files: reading foreign formats safely, and initialising a run from converted ones.

Readers (all return a flat ``{name: np.ndarray}``, nothing is executed):

* `read_torch`: a PyTorch ``torch.save`` state dict, without PyTorch. Both containers
  torch writes are read: the zip archive (torch >= 1.6: ``<archive>/data.pkl`` plus one
  raw file per storage, ``<archive>/data/<key>``) and the legacy single stream (older
  files, e.g. torchvision's ``vgg16-397923af.pth``: magic number, protocol, system info,
  the pickle, then the storages). The pickle is read by `TorchUnpickler`, which resolves
  only the handful of globals a state dict needs (``collections.OrderedDict``,
  ``torch._utils._rebuild_tensor_v2`` and friends, the ``torch.*Storage`` types) to
  local stand-ins; any other global is refused with `UnsafePickleError`.
* `read_safetensors`: the safetensors format, parsed here (8-byte little-endian header
  length, a JSON header ``{name: {dtype, shape, data_offsets}}``, the raw bytes).
* `read_keras`: Keras weights with h5py (no TensorFlow): the ``keras.applications``
  downloads (``*_weights_tf_dim_ordering_tf_kernels*.h5``), ``model.save('x.h5')`` and
  ``model.save('x.keras')``. Names are ``'<layer>/<variable>'`` (``'conv1_conv/kernel'``).

Converted parameter trees (what ``python -m scaleattn.convert`` writes) are msgpack
files (`save_pretrained` / `read_pretrained`): ``{'meta': {...}, 'params': {'backbone':
..., 'largefov': {'fc6', 'fc7'}}, 'batch_stats': {'backbone': ...}}``. With
``config.model.init_from`` set, `load_pretrained` puts them into a fresh `TrainState`
(`train.initial_state` calls it): the backbone (and LargeFOV's fc6/fc7) come from the
file, everything else keeps its fresh initialisation, and the log says which is which.
"""

import collections
import dataclasses
import io
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import serialization, traverse_util

FORMAT = "scaleattn.pretrained/1"


class WeightsError(ValueError):
    """A weight file that cannot be used; the message names the file and the key."""


class UnsafePickleError(WeightsError):
    """A pickle that asks for a global outside the state-dict allowlist."""


# --------------------------------------------------------------------------- sniffing

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


KINDS = {"torch_zip": "PyTorch state dict (zip)", "torch_legacy": "PyTorch state dict (legacy)",
         "safetensors": "safetensors file", "hdf5": "HDF5 (Keras) file",
         "keras_zip": ".keras archive", "msgpack": "converted (msgpack) file"}


def sniff(path: str) -> str:
    """The container of ``path``: 'torch_zip', 'torch_legacy', 'safetensors', 'hdf5',
    'keras_zip' (a ``.keras`` archive) or 'msgpack' (our converted files)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise WeightsError(f"{path}: cannot open ({e.strerror or e})") from e
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightsError(f"{path}: truncated or corrupt zip archive ({e}); "
                               f"download it again") from e
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch_zip"
        if "model.weights.h5" in names:
            return "keras_zip"
        raise WeightsError(f"{path}: a zip archive that is neither a torch.save file "
                           f"(no data.pkl) nor a .keras file (no model.weights.h5)")
    if head[:2] == b"\x80\x02":
        return "torch_legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] in (b"\x80", b"\x81", b"\x82", b"\x83", b"\xde", b"\xdf"):
        return "msgpack"
    raise WeightsError(f"{path}: unknown weight format (expected a torch .pth, "
                       f".safetensors, Keras .h5/.keras or a converted .msgpack file)")


# --------------------------------------------------------------------------- torch

# torch storage class -> element dtype (little-endian; byte order is fixed up on read).
TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # pylint: disable=import-outside-toplevel
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: only its element dtype matters."""
    name: str

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(TORCH_STORAGE_DTYPES[self.name])


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
    """``data`` (the 1-D storage) viewed as the tensor ``ref``; bounds are checked."""
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
    return data if little_endian or data.dtype.itemsize == 1 else data.byteswap()


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
    """A zip-format ``torch.save`` state dict -> ``{name: array}``."""
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
            unpickler = TorchUnpickler(io.BytesIO(zf.read(pkl[0])), source=path, legacy=False)
            items = _state_dict_items(_unpickle(unpickler, path), path)
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


def _unpickle(unpickler: pickle.Unpickler, path: str):
    try:
        return unpickler.load()
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
        header = [_unpickle(TorchUnpickler(f, source=path, legacy=True), path)
                  for _ in range(3)]
        magic, protocol, sys_info = header
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: not a torch.save file (magic {magic!r}, protocol "
                               f"{protocol!r})")
        little = not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True)
        items = _state_dict_items(
            _unpickle(TorchUnpickler(f, source=path, legacy=True), path), path)
        keys = _unpickle(TorchUnpickler(f, source=path, legacy=True), path)
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


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A ``torch.save`` state dict (zip or legacy) or a ``.safetensors`` file."""
    kind = sniff(path)
    readers = {"torch_zip": read_torch_zip, "torch_legacy": read_torch_legacy,
               "safetensors": read_safetensors}
    if kind not in readers:
        raise WeightsError(f"{path}: a {KINDS[kind]}, not a PyTorch state dict (.pth or "
                           f".safetensors); for Keras weights use --from=keras")
    return readers[kind](path)


# --------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16", "I64": "<i8",
    "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
    "U8": "u1", "BOOL": "?",
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file -> ``{name: array}`` (parsed here, no extra package)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise WeightsError(f"{path}: truncated safetensors file ({len(blob)} bytes)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise WeightsError(f"{path}: safetensors header of {header_len} bytes does not fit "
                           f"in the file ({len(blob)} bytes): truncated")
    try:
        header = json.loads(blob[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_len = 8 + header_len, len(blob) - 8 - header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = numpy_dtype(SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: bad safetensors entry {name!r}: {info!r:.120}") from e
        count = int(np.prod(shape, dtype=np.int64))
        if (min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len
                or end - begin != count * dtype.itemsize):
            raise WeightsError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has "
                               f"data_offsets [{begin}, {end}] outside the {data_len} data "
                               f"bytes or of the wrong size: truncated or corrupt")
        out[name] = np.frombuffer(blob, dtype, count, data_start + begin).reshape(shape)
    return out


# --------------------------------------------------------------------------- keras


def snake_case(name: str) -> str:
    """Keras' name for an unnamed object of a class: 'BatchNormalization' ->
    'batch_normalization', 'Conv2D' -> 'conv2d' (how Keras 3 files key layers)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_variable_names(class_name: str, config: Mapping) -> list[str]:
    """The variables of a Keras 3 layer in the order its ``vars/<i>`` hold them."""
    if class_name in ("Conv2D", "Dense", "DepthwiseConv2D"):
        return ["kernel"] + (["bias"] if config.get("use_bias", True) else [])
    if class_name == "BatchNormalization":
        return ((["gamma"] if config.get("scale", True) else []) +
                (["beta"] if config.get("center", True) else []) +
                ["moving_mean", "moving_variance"])
    return []


def _h5_attr_list(group, name: str) -> list[str]:
    """A Keras string-list attribute, possibly chunked as ``name0, name1, ...``."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


KERAS_VARIABLES = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def keras_names_by_position(arrays: list[np.ndarray]) -> list[str] | None:
    """Variable names of a layer's weights from their order, as Keras loads them: a conv
    or dense layer holds ``(kernel[, bias])``, a batch norm ``(gamma, beta, moving_mean,
    moving_variance)``. For old files whose names say nothing (Keras 1's
    ``block1_conv1_W_1:0``); None if the arrays fit neither."""
    if len(arrays) == 4 and all(a.ndim == 1 for a in arrays):
        return ["gamma", "beta", "moving_mean", "moving_variance"]
    if len(arrays) in (1, 2) and arrays[0].ndim in (2, 4) and arrays[-1].ndim in (1, 2, 4):
        return ["kernel", "bias"][:len(arrays)]
    return None


def _read_keras_layer_groups(root, path: str) -> dict[str, np.ndarray]:
    """Keras 1/2 and legacy-h5 layout: ``<layer>/<weight_name>`` datasets listed by the
    ``layer_names`` and ``weight_names`` attributes (the keras.applications downloads)."""
    out = {}
    for layer in _h5_attr_list(root, "layer_names"):
        group = root[layer]
        names = _h5_attr_list(group, "weight_names")
        arrays = [np.asarray(group[n]) for n in names]
        variables = [n.split("/")[-1].split(":")[0] for n in names]
        if not set(variables) <= set(KERAS_VARIABLES):
            variables = keras_names_by_position(arrays)
            if variables is None:
                raise WeightsError(f"{path}: cannot tell the variables of layer {layer!r} "
                                   f"({names}, shapes {[a.shape for a in arrays]})")
        out.update({f"{layer}/{v}": a for v, a in zip(variables, arrays)})
    if not out:
        raise WeightsError(f"{path}: no Keras weights found (no layer_names attribute)")
    return out


def _read_keras3_vars(h5, layers_config: list, path: str) -> dict[str, np.ndarray]:
    """Keras 3 layout (``.keras`` / ``.weights.h5``): ``layers/<snake class>[_n]/vars/<i>``,
    named back with the layer list of the model's ``config.json``."""
    out, used = {}, {}
    for layer in layers_config:
        class_name, cfg = layer["class_name"], layer.get("config", {})
        base = snake_case(class_name)
        used[base] = used.get(base, -1) + 1
        key = base if used[base] == 0 else f"{base}_{used[base]}"
        group = h5.get(f"layers/{key}/vars")
        if group is None or not len(group):
            continue
        if class_name in ("Functional", "Sequential", "Model"):
            raise WeightsError(f"{path}: nested model {cfg.get('name')!r}; save the "
                               f"backbone model itself")
        names = keras_variable_names(class_name, cfg)
        if len(names) != len(group):
            raise WeightsError(f"{path}: layer {cfg.get('name')!r} ({class_name}) has "
                               f"{len(group)} variables, expected {names}")
        for i, var in enumerate(names):
            out[f"{cfg['name']}/{var}"] = np.asarray(group[str(i)])
    if not out:
        raise WeightsError(f"{path}: no Keras weights found")
    return out


def read_keras(path: str) -> dict[str, np.ndarray]:
    """Keras weights (``.h5`` download or ``model.save`` file, or ``.keras``) ->
    ``{'<layer>/<variable>': array}``, read with h5py."""
    kind = sniff(path)
    if kind not in ("hdf5", "keras_zip"):
        raise WeightsError(f"{path}: a {KINDS[kind]}, not Keras weights (.h5/.keras); for "
                           f"PyTorch state dicts use --from=torchvision")
    import h5py  # pylint: disable=import-outside-toplevel
    try:
        if kind == "keras_zip":
            with zipfile.ZipFile(path) as zf:
                config = json.loads(zf.read("config.json"))
                weights_h5 = zf.read("model.weights.h5")
            with h5py.File(io.BytesIO(weights_h5), "r") as h5:
                return _read_keras3_vars(h5, config["config"]["layers"], path)
        with h5py.File(path, "r") as h5:
            root = h5["model_weights"] if "model_weights" in h5 else h5
            if "layer_names" in root.attrs or "layer_names0" in root.attrs:
                return _read_keras_layer_groups(root, path)
            if "layers" in h5:
                raise WeightsError(
                    f"{path}: a Keras 3 .weights.h5 file, which does not store layer names; "
                    f"save the model with model.save('x.keras') (or 'x.h5') instead")
            raise WeightsError(f"{path}: an HDF5 file without Keras weights")
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: cannot read Keras weights (truncated or corrupt?): "
                           f"{e}") from e


def read_weights(path: str, source: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of a 'torchvision' (.pth/.safetensors) or 'keras' file."""
    readers = {"torchvision": read_torch, "keras": read_keras}
    if source not in readers:
        raise WeightsError(f"unknown weight source {source!r}; one of {sorted(readers)}")
    return readers[source](path)


# --------------------------------------------------------------------------- our files


def save_pretrained(path: str, tree: Mapping) -> None:
    """Writes a converted tree (``meta``, ``params``, ``batch_stats``) as msgpack,
    through a temporary file so that a crash leaves no half-written ``path``."""
    from scaleattn import outputs  # pylint: disable=import-outside-toplevel
    blob = serialization.msgpack_serialize(dict(tree))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    outputs.atomic_write(path, blob)  # the temporary file goes on any failure


def read_pretrained(path: str) -> dict:
    """A file written by `save_pretrained` -> ``{'meta', 'params', 'batch_stats'}``."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise WeightsError(f"model.init_from={path!r} does not exist; convert ImageNet "
                           f"weights first: python -m scaleattn.convert --from=... --arch=... "
                           f"SRC {path}")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        tree = serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several unrelated types
        raise WeightsError(f"{path}: not a converted weight file or truncated "
                           f"({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict) or tree.get("meta", {}).get("format") != FORMAT:
        raise WeightsError(f"{path}: not written by `python -m scaleattn.convert` "
                           f"(no {FORMAT!r} meta)")
    tree.setdefault("batch_stats", {})
    return tree


# --------------------------------------------------------------------------- a run


def _flat(tree: Mapping) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _unflat(flat: Mapping[tuple, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def _join(path) -> str:
    return "/".join(path)


def check_meta(meta: Mapping, config, path: str) -> None:
    """The converted file fits ``config``: same backbone, stride layout and input
    normalisation (the first conv was folded for the pipeline's mean/std)."""
    model, data = config.model, config.data
    if meta["arch"] != model.backbone:
        raise WeightsError(f"{path} holds {meta['arch']} weights but "
                           f"config.model.backbone={model.backbone!r}")
    if meta.get("stride_in_1x1") is not None and bool(meta["stride_in_1x1"]) != bool(
            model.stride_in_1x1):
        raise WeightsError(
            f"{path} was converted from {meta['source']}, whose ResNet strides on the "
            f"{'1x1' if meta['stride_in_1x1'] else '3x3'} conv: set "
            f"config.model.stride_in_1x1={bool(meta['stride_in_1x1'])}")
    for key, want in (("mean", meta["input_mean"]), ("std", meta["input_std"])):
        have = tuple(float(v) for v in data[key])
        if not np.allclose(have, want, rtol=0, atol=1e-3):
            raise WeightsError(
                f"{path} expects inputs normalised with data.{key}="
                f"{tuple(float(v) for v in want)} but config.data.{key}={have}; set it, or "
                f"convert again with --{key}={','.join(f'{v:g}' for v in have)}")


def merge_pretrained(variables: Mapping, tree: Mapping, path: str = "<pretrained>"
                     ) -> tuple[dict, dict]:
    """Puts a converted ``tree`` into model ``variables`` (``params``, ``batch_stats``).

    Every array of the tree goes to ``net/<its path>`` and must exist there with the same
    shape; every backbone array of the model must be in the tree. A top-level module the
    model does not have (``largefov`` when the head is another) is skipped.

    Returns:
      ``(variables, report)``: the new variables, and ``report`` with the lists
      ``loaded``, ``fresh`` (model arrays left as initialised) and ``unused`` (tree
      arrays skipped), of '/'-joined paths such as 'params/net/backbone/conv1/kernel'.
    """
    out = {col: _flat(variables.get(col, {})) for col in ("params", "batch_stats")}
    loaded, unused = [], []
    for col in ("params", "batch_stats"):
        model_leaves = out[col]
        modules = {k[1] for k in model_leaves if k[0] == "net"}
        for key, value in _flat(tree.get(col, {})).items():
            target = ("net",) + key
            name = _join((col,) + target)
            if key[0] not in modules:
                unused.append(name)
                continue
            if target not in model_leaves:
                raise WeightsError(f"{path}: key {_join((col,) + key)} does not exist in the "
                                   f"model ({name}): converted for another depth or head?")
            want = model_leaves[target]
            if tuple(value.shape) != tuple(want.shape):
                raise WeightsError(
                    f"{path}: key {_join((col,) + key)} has shape {tuple(value.shape)} but "
                    f"the model's {name} has {tuple(want.shape)} (model.width / model.depth "
                    f"must be the standard ones for ImageNet weights)")
            model_leaves[target] = jnp.asarray(value, dtype=want.dtype)
            loaded.append(name)
        done = set(loaded)
        missing = [k for k in model_leaves if k[:2] == ("net", "backbone")
                   and _join((col,) + k) not in done]
        if missing:
            raise WeightsError(f"{path}: the model's {_join((col,) + missing[0])} is missing "
                               f"from the file ({len(missing)} backbone arrays missing)")
    loaded_set = set(loaded)
    fresh = [_join((col,) + k) for col in out for k in out[col]
             if _join((col,) + k) not in loaded_set]
    new = dict(variables)
    for col in out:
        if col in variables:
            new[col] = _unflat(out[col])
    return new, {"loaded": loaded, "fresh": fresh, "unused": unused}


def summarise(paths: list[str], limit: int = 8) -> str:
    """The modules of ``paths`` ('params/net/largefov/fc8/bias' -> 'net/largefov/fc8'),
    the whole backbone as one: 'net/backbone (318 arrays), net/largefov/fc6 (2 arrays)'."""
    counts = collections.Counter()
    for p in paths:
        module = p.split("/", 1)[1].rsplit("/", 1)[0]
        counts["net/backbone" if module.startswith("net/backbone/") else module] += 1
    parts = [f"{m} ({n} array{'s' * (n > 1)})" for m, n in counts.items()]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more if parts else "none"


def load_pretrained(state, config, path: str | None = None):
    """``state`` with the backbone (and fc6/fc7) from ``path`` (default: the file
    ``config.model.init_from`` names, see `config.pretrained_file`).

    Checks the file against the config (`check_meta`), merges it (`merge_pretrained`),
    re-initialises the optimiser state for the new parameters and logs what was loaded
    and what keeps its fresh initialisation.
    """
    if path is None:
        from scaleattn import config as config_lib  # pylint: disable=import-outside-toplevel
        path = config_lib.pretrained_file(config.model)
    path = os.path.expanduser(path)
    tree = read_pretrained(path)
    meta = tree["meta"]
    check_meta(meta, config, path)
    variables, report = merge_pretrained(
        {"params": state.params, "batch_stats": state.batch_stats}, tree, path)
    logging.info("init_from %s (%s from %s %s): loaded %s", path, meta["arch"],
                 meta["source"], meta.get("src", "?"), summarise(report["loaded"]))
    logging.info("freshly initialised (%d arrays): %s", len(report["fresh"]),
                 summarise(report["fresh"]))
    if report["unused"]:
        logging.warning("not used, the model has no such module: %s",
                        summarise(report["unused"]))
    params = variables["params"]
    return state.replace(params=params, batch_stats=variables["batch_stats"],
                         opt_state=state.tx.init(params))
