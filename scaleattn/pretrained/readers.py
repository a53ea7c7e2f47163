"""Readers of foreign weight files: every one returns a flat ``{name: np.ndarray}``.

* `read_torch`: a PyTorch state dict, ``torch.save``'s zip or legacy container
  (`torch_files`, a restricted unpickler: nothing in the file is executed) or a
  ``.safetensors`` file (`read_safetensors`). Names are the state dict's
  (``'layer1.0.conv1.weight'``), arrays keep the tensors' shapes (``[O, I, kh, kw]``
  for convs) and dtypes.
* `read_keras`: Keras ``.h5`` / ``.keras`` files (`keras_files`, h5py, no TensorFlow).
  Names are ``'<layer>/<variable>'`` (``'conv1_conv/kernel'``).
* `read_weights`: one of the two by the ``--from`` source name.

`sniff` tells the container from the first bytes, so that a file given to the wrong
reader gets a message that says what it is.
"""

import zipfile

import numpy as np

from scaleattn.pretrained import keras_files, torch_files
from scaleattn.pretrained.our_format import WeightsError

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


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file -> ``{name: array}`` (the ``safetensors`` package's numpy
    loader; the header's dtype and shape per tensor, ``__metadata__`` left out)."""
    # Imported when used: a machine that only benchmarks needs no safetensors.
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, AttributeError, TypeError) as e:
        # AttributeError / TypeError: a dtype numpy has no type for (e.g. F8_E4M3).
        raise WeightsError(f"{path}: truncated or corrupt safetensors file, or a dtype numpy "
                           f"cannot hold ({type(e).__name__}: {e})") from e


TORCH_READERS = {"torch_zip": torch_files.read_torch_zip,
                 "torch_legacy": torch_files.read_torch_legacy,
                 "safetensors": read_safetensors}
KERAS_READERS = {"hdf5": keras_files.read_keras_h5,
                 "keras_zip": keras_files.read_keras_archive}


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A ``torch.save`` state dict (zip or legacy) or a ``.safetensors`` file ->
    ``{name: array}``."""
    kind = sniff(path)
    if kind not in TORCH_READERS:
        raise WeightsError(f"{path}: a {KINDS[kind]}, not a PyTorch state dict (.pth or "
                           f".safetensors); for Keras weights use --from=keras")
    return TORCH_READERS[kind](path)


def read_keras(path: str) -> dict[str, np.ndarray]:
    """Keras weights (``.h5`` download or ``model.save`` file, or ``.keras``) ->
    ``{'<layer>/<variable>': array}``."""
    kind = sniff(path)
    if kind not in KERAS_READERS:
        raise WeightsError(f"{path}: a {KINDS[kind]}, not Keras weights (.h5/.keras); for "
                           f"PyTorch state dicts use --from=torchvision")
    try:
        return KERAS_READERS[kind](path)
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
