"""Entry point: ``python -m scaleattn.main --config=configs/demo.py --workdir=DIR``.

``--mode=train`` trains (resuming from ``DIR`` if it holds checkpoints) and evaluates;
``--mode=eval`` evaluates the latest checkpoint. Any config value can be overridden,
e.g. ``--config.train.steps=200``.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from scaleattn import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, without KeyError's quotes."""
    text = str(error.args[0] if error.args else error).strip("'\"")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def parse_flags(argv):
    """Parses flags; a bad --config override stops with one line that names it."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"error: bad config override in {' '.join(overrides)}: unknown key or "
                 f"wrong type ({first_line(e)}). See scaleattn/config.py for the keys.")


def load_config():
    """The parsed config; a config file that fails to load stops with one line."""
    try:
        return FLAGS.config
    except (OSError, AttributeError, KeyError) as e:
        sys.exit(f"error: cannot load --config={FLAGS['config'].config_filename}: "
                 f"{first_line(e)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from scaleattn import checkpoint, train  # pylint: disable=import-outside-toplevel
    from scaleattn.data import errors  # pylint: disable=import-outside-toplevel
    config = load_config()
    try:
        config_lib.validate(config)
        jax.config.update("jax_default_prng_impl", config.prng_impl)
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        else:
            train.evaluate_checkpoint(config, FLAGS.workdir)
    except (config_lib.ConfigError, errors.DataError, checkpoint.CheckpointError,
            train.NonFiniteLossError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
