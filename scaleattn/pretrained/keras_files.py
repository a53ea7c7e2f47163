"""Keras weight files read with h5py (no TensorFlow): names ``'<layer>/<variable>'``.

Three layouts exist:

* Keras 1/2 and the legacy HDF5 format (the ``keras.applications`` downloads
  ``*_weights_tf_dim_ordering_tf_kernels*.h5`` and ``model.save('x.h5')``): one group
  per layer, listed by the ``layer_names`` attribute, holding the datasets its
  ``weight_names`` attribute lists (`read_keras_h5`).
* Keras 3's ``.keras`` zip: ``config.json`` (the layer list) and ``model.weights.h5``,
  where a layer's variables are ``layers/<snake_case class>[_n]/vars/<i>`` and get their
  names back from the layer list (`read_keras_archive`).
* Keras 3's bare ``.weights.h5``, which keeps no names and is refused.

Both readers return ``{'<layer>/<variable>': np.ndarray}``, e.g. ``'conv1_conv/kernel'``
``[7, 7, 3, 64]`` (kernels are HWIO, as Keras keeps them).
"""

import io
import json
import re
import zipfile
from typing import Mapping

import numpy as np

from scaleattn.pretrained.our_format import WeightsError

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




def read_keras_archive(path: str) -> dict[str, np.ndarray]:
    """A Keras 3 ``.keras`` zip -> ``{'<layer>/<variable>': array}``."""
    import h5py  # pylint: disable=import-outside-toplevel
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
        weights_h5 = zf.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights_h5), "r") as h5:
        return _read_keras3_vars(h5, config["config"]["layers"], path)


def read_keras_h5(path: str) -> dict[str, np.ndarray]:
    """A Keras HDF5 file (a download or ``model.save('x.h5')``) ->
    ``{'<layer>/<variable>': array}``; a bare Keras 3 ``.weights.h5`` is refused."""
    import h5py  # pylint: disable=import-outside-toplevel
    with h5py.File(path, "r") as h5:
        root = h5["model_weights"] if "model_weights" in h5 else h5
        if "layer_names" in root.attrs or "layer_names0" in root.attrs:
            return _read_keras_layer_groups(root, path)
        if "layers" in h5:
            raise WeightsError(
                f"{path}: a Keras 3 .weights.h5 file, which does not store layer names; "
                f"save the model with model.save('x.keras') (or 'x.h5') instead")
        raise WeightsError(f"{path}: an HDF5 file without Keras weights")
