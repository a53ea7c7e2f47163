"""Merging a converted backbone into a fresh train state (``config.model.init_from``).

`load_pretrained` reads the file named by the config (`our_format.read_pretrained`),
checks that it fits the config (`check_meta`: backbone, stride layout, input
normalisation), puts its arrays into the model's variables (`merge_pretrained`: the
backbone, and LargeFOV's fc6/fc7, from the file; everything else keeps its fresh
initialisation) and logs which is which (`summarise`).
"""

import collections
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from scaleattn import config as config_lib
from scaleattn.pretrained.our_format import WeightsError, read_pretrained

def _flat(tree: Mapping) -> dict[tuple, Any]:
    """A nested dict -> ``{('a', 'b', 'leaf'): array}`` (``{}`` for an empty tree)."""
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _unflat(flat: Mapping[tuple, Any]) -> dict:
    """The inverse of `_flat`."""
    return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def _join(path) -> str:
    """``('params', 'net', 'conv1')`` -> ``'params/net/conv1'``."""
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
