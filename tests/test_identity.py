"""What identifies a run: every schema key has a class, and the checkpoint check and the
report's seed groups both follow that one table."""
import contextlib
import fnmatch
import json

import pytest

from scaleattn import checkpoint, identity, report
from scaleattn import config as config_lib

SCHEMA_KEYS = list(identity.flat_config(config_lib.base_config()))


def test_every_schema_key_has_a_class_and_every_pattern_a_key():
    rows = identity.key_classes(config_lib.base_config())
    assert [key for key, _, _ in rows] == SCHEMA_KEYS
    assert {cls for _, cls, _ in rows} == {identity.MODEL, identity.RECIPE, identity.DRAW,
                                           identity.EXECUTION}
    for pattern, _, _ in identity.CLASSES:
        assert any(fnmatch.fnmatchcase(key, pattern) for key in SCHEMA_KEYS), pattern


def test_which_keys_define_the_model():
    for key in ("model.merge", "model.gsag_window", "model.scales", "data.mean", "data.std"):
        assert identity.is_model_defining(key), key
    for key in ("model.dropout", "model.dtype", "model.dilated_conv", "model.remat",
                "model.fold_frozen_bn", "model.init_from", "model.inference_scales",
                "optim.base_lr", "data.crop_size", "seed"):
        assert not identity.is_model_defining(key), key


def record(config, seed=0):
    return {"name": config.name, "steps": 10, "seed": seed, "miou": 0.5,
            "config": json.loads(config.to_json())}


# One key of each class, with a value other than the demo's.
CHANGES = {"model.merge": "max", "model.dtype": "bfloat16", "optim.base_lr": 0.5,
           "seed": 7, "prng_impl": "threefry2x32", "data.data_dir": "/elsewhere",
           "parallel.mode": "jit", "model.dilated_conv": "taps"}


@pytest.mark.parametrize("key,value", CHANGES.items())
def test_checkpoint_check_and_report_read_the_one_table(key, value):
    """A change of a ``model`` key stops a restore and splits a seed group; a ``recipe``
    key only splits the group; ``draw`` and ``execution`` keys do neither."""
    base = config_lib.recipe("demo")
    changed = config_lib.recipe("demo")
    *sections, last = key.split(".")
    node = changed
    for section in sections:
        node = node[section]
    node[last] = value
    saved = json.loads(base.to_json())
    cls = identity.key_class(key)
    restore_differs = [k for k, _, _ in checkpoint.model_differences(saved, changed)]
    assert restore_differs == ([key] if cls == identity.MODEL else [])
    with pytest.raises(checkpoint.CheckpointError) if cls == identity.MODEL \
            else contextlib.nullcontext():
        checkpoint.check_same_model(saved, changed, "ckpt/4")
    same = report.same_but_seed(record(base), record(changed, seed=1))
    assert same == (cls in (identity.DRAW, identity.EXECUTION))

