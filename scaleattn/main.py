"""Entry point: ``python -m scaleattn.main --config=configs/demo.py --workdir=DIR``.

``--mode=train`` trains (resuming from ``DIR`` if it holds checkpoints) and evaluates;
``--mode=eval`` evaluates the latest checkpoint; ``--mode=bench`` times the steps on
synthetic batches (no TensorFlow, no --workdir needed); ``--mode=predict --input=...``
writes masks and attention maps; ``--mode=analyze`` relates attention to object size;
``--mode=crf_search`` picks the dense CRF's appearance kernel on val images;
``--mode=preflight --topology=v5e:2x2`` compiles the train and eval steps for a Cloud
TPU topology on any host and says whether the run fits (docs/preflight.md).
Any config value can be overridden,
e.g. ``--config.train.steps=200``.
"""

import copy
import logging as std_logging
import os
import re
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from scaleattn import config as config_lib
from scaleattn.outputs import error_line as first_line

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file and its variants, PATH or "
                                "PATH:VARIANTS (e.g. configs/gsag.py:incremental,r50).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "bench", "predict", "analyze",
                                   "crf_search", "preflight"],
                  "What to run.")
flags.DEFINE_list("input", [], "--mode=predict: image files or folders.")
flags.DEFINE_string("output", None, "--mode=bench, crf_search, preflight, eval: JSON file "
                    "(default WORKDIR/<mode>.json; preflight, eval: none); predict, analyze: "
                    "folder (default WORKDIR/<mode>).")
flags.DEFINE_string("topology", None, "--mode=preflight: the Cloud TPU topology to compile "
                    "for, as JAX names it (v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:2x2), or "
                    "h100:N (N GPUs of one host; docs/preflight.md).")
flags.DEFINE_enum("preflight_batch", "config", ["config", "auto"], "--mode=preflight: "
                  "'config' compiles batch_size; 'auto' also finds the largest train batch "
                  "that fits, and which parallel.param_sharding fits the most.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                    "(jax.distributed); with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: the index of this process.")
flags.DEFINE_bool("distributed", False, "Multi-process from the environment: "
                  "jax.distributed.initialize() finds the coordinator on Cloud TPU VMs and "
                  "SLURM (automatic inside an srun step of several tasks).")
flags.DEFINE_bool("checkpoint_fallback", False, "--mode=eval|predict|analyze|crf_search: if "
                  "the newest checkpoint is damaged (fails its checksums) or holds NaN/Inf "
                  "values, use the newest good one instead of stopping.")
flags.DEFINE_bool("skip_bad_inputs", False, "--mode=predict: predict the readable images and "
                  "list the unreadable ones at the end, instead of stopping before any output.")
flags.mark_flags_as_required(["config"])

# Exit statuses. 0: done; 1: an error, said in one line on stderr. PREEMPTED_EXIT: a
# training run stopped early by SIGTERM (preemption, a time limit) or SIGINT (Ctrl-C)
# after saving its checkpoint; rerunning the same command resumes it (EX_TEMPFAIL,
# "try again"; the launchers requeue on it). INTERRUPTED_EXIT (128 + SIGINT): a second
# Ctrl-C, or one outside a training loop: stopped at once.
PREEMPTED_EXIT = 75
INTERRUPTED_EXIT = 128 + signal.SIGINT


class ConfigFileParser(flags.ArgumentParser):
    """Reads ``--config=PATH[:ARG]`` with `config_lib.load`, the one loader, once per
    start; a file that cannot be loaded stops with one line. ``file_config`` keeps the
    file's values before the command line's ``--config.*`` overrides."""

    file_config = None

    def __init__(self, name: str):
        self.name = name

    def flag_type(self):
        return "config object"

    def parse(self, path):
        try:
            config = config_lib.load(path)
        except config_lib.ConfigError as e:
            sys.exit(f"error: {e}")
        ConfigFileParser.file_config = copy.deepcopy(config)
        config.lock()
        return config


FLAGS["config"].parser = ConfigFileParser("config")


def parse_flags(argv):
    """Parses flags; a config file that does not load or a bad --config override stops
    with one line that names it."""
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
        config = FLAGS.config
        config.to_json()  # any access reports a loading error
        return config
    except Exception as e:  # pylint: disable=broad-except
        sys.exit(f"error: cannot load --config={FLAGS['config'].config_filename}: "
                 f"{first_line(e)}")


def name_with_overrides(config, file_config) -> None:
    """Appends the model-defining keys overridden on the command line to ``config.name``
    (``demo_attention+merge=max``), so logs and run.json tell the run from its recipe."""
    from scaleattn import checkpoint, identity  # pylint: disable=import-outside-toplevel
    if file_config is None:
        return
    overridden = config_flags.get_override_values(FLAGS["config"])
    changed = [(key, new) for key, _, new in identity.differences(file_config, config)
               if key in overridden]
    if changed:
        suffix = "".join(f"+{key.removeprefix('model.')}={checkpoint.flag_value(value)}"
                         for key, value in changed)
        config.name = f"{config.name}{suffix}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # pylint: disable=import-outside-toplevel
    from scaleattn import (checkpoint, experiment, inference, loop, outputs, parallel,
                           preemption, runlock)
    from scaleattn.data import errors
    from scaleattn.pretrained import WeightsError
    config = load_config()
    try:
        config_lib.validate(config)
        name_with_overrides(config, ConfigFileParser.file_config)
        jax.config.update("jax_default_prng_impl", config.prng_impl)
        parallel.set_compile_effort(config.parallel)
        if parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id, auto=FLAGS.distributed):
            if jax.process_index() != 0:  # only process 0 logs progress
                logging.set_verbosity(logging.WARNING)
        if FLAGS.mode == "preflight":
            run_preflight(config)
            return
        if FLAGS.mode != "bench" and not FLAGS.workdir:
            raise config_lib.ConfigError(f"--mode={FLAGS.mode} needs --workdir")
        if FLAGS.mode == "train":
            scores = loop.train_and_evaluate(config, FLAGS.workdir)
            if jax.process_index() == 0:
                print_summary(config, scores)
        elif FLAGS.mode == "eval":
            run_eval(config)
        else:
            run_tool(config)
    except preemption.Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except (config_lib.ConfigError, errors.DataError, checkpoint.CheckpointError,
            loop.NonFiniteLossError, WeightsError, runlock.WorkdirLocked,
            outputs.OutputError, inference.NonFiniteScores) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a file or folder that cannot be read or written, named
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or first_line(e)}")
    except Exception as e:  # pylint: disable=broad-except
        message = environment_error(e)
        if message is None:
            raise
        sys.exit(f"error: {message}")


def environment_error(error: Exception) -> str | None:
    """The one line for an error of the machine rather than of the code: a JAX backend
    that cannot start (``JAX_PLATFORMS`` naming one this install lacks) or device
    memory running out; ``None`` for any other error."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if platforms and (isinstance(error, (RuntimeError, AssertionError))
                      and any(f.endswith("xla_bridge.py") for f in frames)):
        detail = first_line(error) if str(error) else "that backend is not installed"
        return (f"JAX_PLATFORMS={platforms}: JAX cannot start that backend on this machine "
                f"({detail}); unset JAX_PLATFORMS to use what is there, or install the JAX "
                f"build for it")
    if "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error):
        return (f"the device ran out of memory ({first_line(error, limit=160)}): lower "
                f"batch_size, data.crop_size / data.eval_size or model.scales / "
                f"predict.ms_scales, or set train.grad_accum_steps / model.remat")
    return None


def print_summary(config, scores: dict) -> None:
    """The last lines of a training run (`run_summary`): scores by class, where the
    checkpoint, logs and pictures are, the next commands."""
    # pylint: disable=import-outside-toplevel
    from scaleattn import checkpoint, run_summary, summaries
    from scaleattn.data import pipeline
    folder = os.path.join(checkpoint.resolve_workdir(FLAGS.workdir), summaries.PICTURES_DIR)
    pictures = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                      if name.endswith(".png")) if os.path.isdir(folder) else []
    print("\n".join(run_summary.lines(
        config_file=FLAGS["config"].config_filename, workdir=FLAGS.workdir, scores=scores,
        steps=config.train.steps, class_names=pipeline.class_names(config.data),
        pictures=pictures)), flush=True)


def run_eval(config) -> None:
    """--mode=eval: scores of WORKDIR's latest checkpoint, logged; with --output also
    written there as JSON (the workdir itself is not changed)."""
    # pylint: disable=import-outside-toplevel
    import json
    from scaleattn import experiment, outputs
    output = FLAGS.output and outputs.check_not_over(
        outputs.check_file(FLAGS.output, "--output", missing_folder_ok=True), "--output",
        inputs=[FLAGS["config"].config_filename.split(":", 1)[0]], workdirs=[FLAGS.workdir])
    scores = experiment.evaluate_checkpoint(config, FLAGS.workdir,
                                            fallback=FLAGS.checkpoint_fallback)
    if output:
        record = {"config": config.name, "workdir": os.path.abspath(FLAGS.workdir),
                  "eval_split": config.data.eval_split,
                  "scales": list(config.model.inference_scales or config.model.scales),
                  **experiment.scores_record(scores)}
        os.makedirs(os.path.dirname(output), exist_ok=True)
        outputs.atomic_write(output, json.dumps(record, indent=1) + "\n")
        logging.info("wrote %s", output)


def run_preflight(config) -> None:
    """--mode=preflight: needs --topology; no --workdir, no data, no TPU."""
    # pylint: disable=import-outside-toplevel
    from scaleattn import outputs, preflight
    if not FLAGS.topology:
        raise config_lib.ConfigError("--mode=preflight needs --topology (e.g. v5e:2x2)")
    if not os.environ.get("JAX_PLATFORMS"):  # shapes are traced on the host CPU; the
        jax.config.update("jax_platforms", "cpu")  # steps are compiled for the topology
    output = FLAGS.output and outputs.check_file(FLAGS.output, "--output",
                                                 missing_folder_ok=True)
    preflight.run(config, FLAGS.topology, batch=FLAGS.preflight_batch, output=output)


def run_tool(config) -> None:
    """--mode=bench|predict|analyze|crf_search (bench imports no TensorFlow)."""
    # pylint: disable=import-outside-toplevel
    output = FLAGS.output or os.path.join(FLAGS.workdir or ".", FLAGS.mode +
                                          (".json" if FLAGS.mode in ("bench", "crf_search")
                                           else ""))
    from scaleattn import outputs
    outputs.check_not_over(output, "--output", folder=FLAGS.mode in ("predict", "analyze"),
                           inputs=[FLAGS["config"].config_filename.split(":", 1)[0],
                                   *FLAGS.input],
                           workdirs=[FLAGS.workdir] if FLAGS.workdir else [])
    if FLAGS.mode == "bench":
        from scaleattn import bench
        bench.main(config, outputs.check_file(output, "--output", missing_folder_ok=True))
    elif FLAGS.mode == "predict":
        from scaleattn import predict
        predict.predict_files(config, FLAGS.workdir, FLAGS.input, output,
                              skip_bad_inputs=FLAGS.skip_bad_inputs,
                              fallback=FLAGS.checkpoint_fallback)
    elif FLAGS.mode == "crf_search":
        from scaleattn import crf_search
        crf_search.search(config, FLAGS.workdir, output, fallback=FLAGS.checkpoint_fallback)
    else:
        from scaleattn import analysis
        analysis.analyze(config, FLAGS.workdir, output, fallback=FLAGS.checkpoint_fallback)


class QuietLibraries:
    """A log filter that drops INFO lines from libraries (Orbax logs every file it
    writes; JAX says it found no TPU); their warnings and errors still show."""
    prefixes = ("orbax/", "tensorflow_datasets/", "etils/", "jax/_src/xla_bridge")
    # Warnings that say nothing to a user: Orbax on the read-only managers of eval,
    # predict and analyze (which read-only is what they are meant to be).
    expected = ("Given directory is read only",)

    def filter(self, record) -> bool:
        path = record.pathname.replace("\\", "/")
        noisy = any(f"/{p}" in path for p in self.prefixes)
        if noisy and record.exc_info:  # the error is reported in one line by the caller
            record.exc_info, record.exc_text = None, None
        if noisy and any(text in str(record.msg) for text in self.expected):
            return False
        return record.levelno > std_logging.INFO or not noisy  # absl's INFO is 0, not 20


def run():
    # On the absl handler itself: it hands records to its inner handler's emit(),
    # which never consults that handler's filters.
    logging.get_absl_handler().addFilter(QuietLibraries())
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (start-up, eval, predict)
        print("stopped: interrupted (SIGINT)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    run()
