"""Entry point: ``python -m scaleattn.main --config=configs/demo.py --workdir=DIR``.

``--mode=train`` trains (resuming from ``DIR`` if it holds checkpoints) and evaluates;
``--mode=eval`` evaluates the latest checkpoint; ``--mode=bench`` times the steps on
synthetic batches (no TensorFlow, no --workdir needed); ``--mode=predict --input=...``
writes masks and attention maps; ``--mode=analyze`` relates attention to object size.
Any config value can be overridden,
e.g. ``--config.train.steps=200``.
"""

import logging as std_logging
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from scaleattn import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "bench", "predict", "analyze"],
                  "What to run.")
flags.DEFINE_list("input", [], "--mode=predict: image files or folders.")
flags.DEFINE_string("output", None, "--mode=bench: JSON file (default WORKDIR/bench.json); "
                    "predict, analyze: folder (default WORKDIR/<mode>).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                    "(jax.distributed); with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: the index of this process.")
flags.DEFINE_bool("distributed", False, "Multi-process from the environment: "
                  "jax.distributed.initialize() finds the coordinator on Cloud TPU VMs and "
                  "SLURM (automatic inside an srun step of several tasks).")
flags.mark_flags_as_required(["config"])


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
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        text = str(e).replace("\\n", " ").replace("\\'", "'")
        key = re.search(r"'(\w+)'", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        detail = (f"unknown config key {key.group(1)!r}" if key else first_line(e))
        if hint:
            detail += f' (did you mean "{hint.group(1)}"?)'
        sys.exit(f"error: bad config override {overrides}: {detail}. "
                 f"The keys and their types are in scaleattn/config.py.")


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
    from scaleattn import checkpoint, parallel, train  # pylint: disable=import-outside-toplevel
    from scaleattn.data import errors  # pylint: disable=import-outside-toplevel
    from scaleattn.weights import WeightsError  # pylint: disable=import-outside-toplevel
    config = load_config()
    try:
        config_lib.validate(config)
        jax.config.update("jax_default_prng_impl", config.prng_impl)
        if parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id, auto=FLAGS.distributed):
            if jax.process_index() != 0:  # only process 0 logs progress
                logging.set_verbosity(logging.WARNING)
        if FLAGS.mode != "bench" and not FLAGS.workdir:
            raise config_lib.ConfigError(f"--mode={FLAGS.mode} needs --workdir")
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            train.evaluate_checkpoint(config, FLAGS.workdir)
        else:
            run_tool(config)
    except (config_lib.ConfigError, errors.DataError, checkpoint.CheckpointError,
            train.NonFiniteLossError, WeightsError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")


def run_tool(config) -> None:
    """--mode=bench|predict|analyze (bench imports no TensorFlow)."""
    # pylint: disable=import-outside-toplevel
    output = FLAGS.output or os.path.join(FLAGS.workdir or ".", FLAGS.mode +
                                          (".json" if FLAGS.mode == "bench" else ""))
    if FLAGS.mode == "bench":
        from scaleattn import bench
        bench.main(config, output)
    elif FLAGS.mode == "predict":
        from scaleattn import predict
        predict.predict_files(config, FLAGS.workdir, FLAGS.input, output)
    else:
        from scaleattn import analysis
        analysis.analyze(config, FLAGS.workdir, output)


class QuietLibraries:
    """A log filter that drops INFO lines from libraries (Orbax logs every file it
    writes; JAX says it found no TPU); their warnings and errors still show."""
    prefixes = ("orbax/", "tensorflow_datasets/", "etils/", "jax/_src/xla_bridge")

    def filter(self, record) -> bool:
        path = record.pathname.replace("\\", "/")
        noisy = any(f"/{p}" in path for p in self.prefixes)
        return record.levelno > std_logging.INFO or not noisy  # absl's INFO is 0, not 20


def run():
    # On the absl handler itself: it hands records to its inner handler's emit(),
    # which never consults that handler's filters.
    logging.get_absl_handler().addFilter(QuietLibraries())
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
