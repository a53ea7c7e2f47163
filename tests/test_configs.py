"""The shipped configs: one file per recipe, variants by ``get_config(arg)``, and every
``--config=...`` command the docs show loads (its config and overrides, nothing run)."""
import glob
import itertools
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from scaleattn import config as config_lib
from scaleattn import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every run name a shipped config gives, with the ``--config`` that gives it. The names
# are what run.json, the logs and the report show, so a variant keeps its row's name.
RUN_NAMES = {
    "demo_attention": "configs/demo.py", "demo_single": "configs/demo.py:single",
    "demo_avg": "configs/demo.py:avg", "demo_max": "configs/demo.py:max",
    "demo_noextra": "configs/demo.py:noextra", "demo_hier": "configs/demo.py:hier",
    "demo_gsag_hybrid": "configs/demo.py:gsag_hybrid",
    "demo_gsag_basic": "configs/demo.py:gsag_basic",
    "demo_gsag_incremental": "configs/demo.py:gsag_incremental",
    "voc_s3": "configs/voc.py", "voc_s2": "configs/voc.py:s2",
    "voc_baseline": "configs/voc.py:baseline", "voc_avg": "configs/voc.py:avg",
    "voc_max": "configs/voc.py:max", "voc_s3_noextra": "configs/voc.py:s3_noextra",
    "voc_r101_s3": "configs/voc_r101.py", "voc_r101_hier": "configs/voc_r101.py:hier",
    "gsag_hybrid_r101": "configs/gsag.py", "gsag_hybrid_r101_s3": "configs/gsag.py:s3",
    "gsag_hybrid_r50": "configs/gsag.py:r50", "gsag_hybrid_x101": "configs/gsag.py:x101",
    "gsag_basic_r101": "configs/gsag.py:basic", "gsag_basic_r50": "configs/gsag.py:basic,r50",
    "gsag_basic_x101": "configs/gsag.py:basic,x101",
    "gsag_incremental_r101": "configs/gsag.py:incremental",
    "gsag_incremental_r50": "configs/gsag.py:incremental,r50",
    "gsag_incremental_x101": "configs/gsag.py:incremental,x101",
}


def load(spec):
    return config_lib.load(os.path.join(REPO, spec))


def flat(config, prefix=""):
    """``{'model.merge': 'attention', ...}`` with the values as the config holds them."""
    items = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[prefix + key] = value
    return items


@pytest.mark.parametrize("name,spec", sorted(RUN_NAMES.items()))
def test_each_row_keeps_its_run_name(name, spec):
    assert load(spec).name == name
    assert spec in config_lib.shipped()


def test_shipped_configs_have_distinct_names_and_order_free_arguments():
    names = [load(spec).name for spec in config_lib.shipped()]
    assert len(names) == len(set(names))
    assert flat(load("configs/gsag.py:r50,incremental")) == flat(
        load("configs/gsag.py:incremental,r50"))


@pytest.mark.parametrize("spec", config_lib.shipped())
def test_a_variant_changes_only_the_keys_it_names(spec):
    """Against the file's default: the keys the variant's entries name, no others (the
    entries are not shared state that one variant could change for another)."""
    path, _, arg = spec.partition(":")
    module = config_lib.config_module(os.path.join(REPO, path), path)
    named = set()
    for word in config_lib.comma_list(arg):
        named |= set(next(axis[word] for axis in module.AXES if word in axis))
    base, variant = flat(load(path)), flat(load(spec))
    changed = {k for k in base if base[k] != variant[k]} - {"name"}
    assert changed <= named
    for key in named:
        entry = next(axis[w] for axis in module.AXES for w in config_lib.comma_list(arg)
                     if w in axis and key in axis[w])
        assert variant[key] == entry[key]


def test_bad_variants_say_what_exists():
    with pytest.raises(config_lib.ConfigError, match="'r18' of gsag is not one of: .*r50"):
        load("configs/gsag.py:hybrid,r18")
    with pytest.raises(config_lib.ConfigError, match="'basic' and 'incremental'.*name one"):
        load("configs/gsag.py:basic,incremental")
    with pytest.raises(config_lib.ConfigError, match="no such file"):
        load("configs/voc_s9.py")


# ---- the commands the docs show ------------------------------------------------------

DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))) + [
    os.path.join(REPO, "README.md"), os.path.join(REPO, "launch", "README.md")]


def shell_blocks(text: str):
    """The fenced code blocks of a Markdown text, continuation lines joined."""
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        yield re.sub(r"\\\n\s*", " ", block)


def expand_loops(line: str, block: str) -> list[str]:
    """``line`` once for each value of the ``for X in ...; do`` variables it uses."""
    loops = dict(re.findall(r"for (\w+) in ([^;]+); do", block))
    used = [v for v in loops if re.search(rf"\$\{{?{v}\b", line)]
    lines = []
    for values in itertools.product(*(shlex.split(loops[v]) for v in used)):
        text = line
        for var, value in zip(used, values):
            text = re.sub(rf"\$\{{?{var}\}}?", value, text)
        lines.append(text)
    return lines


def docs_commands() -> list[tuple[str, list[str]]]:
    """``(doc, [--config=..., --config.x=v, ...])`` of every command line in the docs'
    code blocks that names a config."""
    found = []
    for doc in DOCS:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        for block in shell_blocks(text):
            for line in block.splitlines():
                if "--config=" not in line:
                    continue
                for command in expand_loops(line.split("#")[0], block):
                    words = shlex.split(command.replace("$W", "RUN"))
                    config = [w for w in words if re.match(r"--config(=|\.)", w)]
                    if (os.path.relpath(doc, REPO), config) not in found:
                        found.append((os.path.relpath(doc, REPO), config))
    return found


def test_the_docs_show_commands_with_configs():
    commands = docs_commands()
    assert len(commands) >= 10
    assert {c[1][0] for c in commands} >= {"--config=configs/demo.py", "--config=configs/voc.py"}


@pytest.mark.parametrize("doc,args", docs_commands(),
                         ids=lambda x: x if isinstance(x, str) else " ".join(x)[:80])
def test_every_config_command_in_the_docs_loads(doc, args, monkeypatch):
    """Parsed as ``scaleattn.main`` parses them (the config file, then the overrides, on
    a flag of its own): nothing trains; the resulting config validates."""
    del doc
    monkeypatch.chdir(REPO)
    argv = ["scaleattn.main", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values["config"].parser = main.ConfigFileParser("config")
    flag_values(argv)
    config_lib.validate(flag_values.config)


def test_demo_rows_with_trained_batch_norm_never_pad_a_crop():
    """Every demo row trains batch norm (VGG with `model.vgg_batch_norm`, the GSAG
    ResNet) and draws its random rescale so that the rescaled 128-px image still covers
    the crop: mean-pixel padding would skew the batch statistics (configs/demo.py).
    One rescale range for all rows: the rows differ only in what defines them."""
    from scaleattn.data import shapes  # pylint: disable=import-outside-toplevel
    demo = config_lib.load("configs/demo.py")
    for variant in ("attention", "single", "max", "avg", "noextra", "hier",
                    "gsag_basic", "gsag_incremental", "gsag_hybrid"):
        c = config_lib.load(f"configs/demo.py:{variant}")
        assert c.model.bn_mode == "train", variant
        assert c.model.vgg_batch_norm == (c.model.backbone == "vgg16"), variant
        assert c.data.scale_range == demo.data.scale_range, variant
        assert c.data.scale_range[0] * shapes.IMAGE_SIZE >= c.data.crop_size, variant
