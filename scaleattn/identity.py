"""Which config keys identify a run: one table, read wherever two configs are compared.

Every config key belongs to one class (`CLASSES`, first matching pattern wins):

* ``model``: what the trained weights compute (the architecture and the input
  normalisation they learnt). A checkpoint restores (to resume, evaluate, predict,
  analyze) only into a config with the same values (`checkpoint.check_same_model`);
  a command-line override of one is added to the run's name.
* ``recipe``: how the weights were trained and scored (data, loss, optimiser, length,
  regularisers, compute precision, where a fresh run started, the scales and CRF of
  evaluation). It may change between a checkpoint and its evaluation, but two runs are
  one setting of the report (`report.same_but_seed`) only if these match too.
* ``draw``: the random draw (the seed and the generator): runs that differ only here
  are seeds of one setting.
* ``execution``: how the same computation is carried out or recorded (exact rewrites,
  device layout, input-pipeline placement and buffers, paths, logging, checkpoint
  cadence, the tools' own settings, the run's label). Never tells runs apart.

docs/reliability.md shows the table (`python -m benchmarks.docs_tables` renders it from
`key_classes`); tests/test_identity.py checks that every key of the schema has a class.
"""

import fnmatch
import json

import ml_collections

MODEL, RECIPE, DRAW, EXECUTION = "model", "recipe", "draw", "execution"

# (pattern, class, why): the first pattern that matches a key decides its class.
CLASSES = (
    ("seed", DRAW, "the random draw"),
    ("prng_impl", DRAW, "the random number generator: another draw of the same setting"),
    ("name", EXECUTION, "a label, derived from the config"),
    ("model.dropout", RECIPE, "a regulariser of training"),
    ("model.attention_dropout", RECIPE, "a regulariser of training"),
    ("model.gsag_dropout", RECIPE, "a regulariser of training"),
    ("model.bn_mode", RECIPE, "whether training updates batch norm"),
    ("model.sync_bn", RECIPE, "batch statistics over devices, in training"),
    ("model.dtype", RECIPE, "the compute precision: same parameters, other numbers"),
    ("model.init_from", RECIPE, "where a fresh run took its first weights"),
    ("model.inference_scales", RECIPE,
     "the scales a hierarchical model is scored on: same parameters"),
    ("model.dilated_conv", EXECUTION, "exact rewrites of the same convolution"),
    ("model.fold_frozen_bn", EXECUTION, "an exact rewrite of frozen batch norm"),
    ("model.remat", EXECUTION, "recomputation in the backward pass"),
    ("model.pretrained_dir", EXECUTION, "where the ImageNet files are"),
    ("model.*", MODEL, "the architecture"),
    ("data.mean", MODEL, "the input normalisation the weights learnt"),
    ("data.std", MODEL, "the input normalisation the weights learnt"),
    ("data.augment_on", EXECUTION, "host or device: the same augmentation"),
    ("data.canvas_size", EXECUTION, "the device augmentation's buffer"),
    ("data.data_dir", EXECUTION, "a path"),
    ("data.manual_dir", EXECUTION, "a path"),
    ("data.prefetch", EXECUTION, "input buffering"),
    ("data.device_prefetch", EXECUTION, "input buffering"),
    ("train.log_every", EXECUTION, "logging"),
    ("train.eval_every", EXECUTION, "evaluation during training"),
    ("train.eval_at_end", EXECUTION, "whether to score at the end"),
    ("train.checkpoint_every", EXECUTION, "checkpoint cadence (resumes are exact)"),
    ("train.keep_checkpoints", EXECUTION, "checkpoints kept"),
    ("train.keep_best", EXECUTION, "checkpoints kept"),
    ("train.async_checkpoints", EXECUTION, "how checkpoints are written"),
    ("eval.batch_size", EXECUTION, "evaluation batching: the same sums"),
    ("parallel.exec_time_effort", EXECUTION, "how hard XLA optimises the same program"),
    ("parallel.*", EXECUTION, "the device layout: the same step (tests/test_parallel.py)"),
    ("bench.*", EXECUTION, "--mode=bench's settings"),
    ("predict.summary_images", EXECUTION, "pictures in TensorBoard"),
    ("predict.overlay_alpha", EXECUTION, "pictures"),
    ("crf.search_*", EXECUTION, "--mode=crf_search's grid"),
    ("*", RECIPE, "the training and evaluation recipe"),
)


def key_class(key: str) -> str:
    """The class of config key ``key`` (``'model.merge'`` -> 'model')."""
    return next(cls for pattern, cls, _ in CLASSES if fnmatch.fnmatchcase(key, pattern))


def flat_config(config: dict | ml_collections.ConfigDict) -> dict:
    """``{'model.merge': 'attention', ...}`` of a config or its JSON dict (a run.json's
    ``config``), values as in JSON (tuples are lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json())
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value
    walk(config, "")
    return flat


def is_model_defining(key: str) -> bool:
    """Whether ``key`` changes the function trained weights compute (must match to restore)."""
    return key_class(key) == MODEL


def defines_setting(key: str) -> bool:
    """Whether ``key`` must match for two runs to be seeds of one setting."""
    return key_class(key) in (MODEL, RECIPE)


def differences(a: dict | ml_collections.ConfigDict, b: dict | ml_collections.ConfigDict,
                which=is_model_defining) -> list[tuple]:
    """``[(key, a's value, b's value), ...]`` of the keys ``which`` selects that differ;
    a key only one side has is not compared (a config of an older schema: its default
    keeps the earlier behaviour)."""
    fa, fb = flat_config(a), flat_config(b)
    return [(k, fa[k], fb[k]) for k in sorted(fa.keys() & fb.keys())
            if which(k) and fa[k] != fb[k]]


def key_classes(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """``[(key, class, why), ...]`` for every key of ``config``, in schema order."""
    rows = []
    for key in flat_config(config):
        _, cls, why = next(entry for entry in CLASSES if fnmatch.fnmatchcase(key, entry[0]))
        rows.append((key, cls, why))
    return rows
