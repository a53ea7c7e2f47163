"""Builds the ``voc2012`` TFDS dataset (VOC 2012 + SBD) once, before training.

    python -m scaleattn.data.build --data_dir=~/tensorflow_datasets \\
        --manual_dir=/path/with/archives [--download] [--download_dir=...]

The manual dir holds ``VOCtrainval_11-May-2012.tar`` and ``benchmark.tgz``; with
``--download`` the ones it lacks are downloaded (through TFDS). Shows TFDS's
progress bars, then prints the number of examples per split. On a malformed
input prints the one-line `VocDataError` message (no traceback) and exits 1.
A dataset that is already built is reused, not rebuilt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from scaleattn import outputs

SPLITS = ("train", "val", "train_aug")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scaleattn.data.build",
        description="Build the voc2012 TFDS dataset (PASCAL VOC 2012 + SBD).")
    parser.add_argument("--data_dir", required=True,
                        help="TFDS data dir to write to (config: data.data_dir)")
    parser.add_argument("--manual_dir", default=None,
                        help="folder with VOCtrainval_11-May-2012.tar and benchmark.tgz "
                             "(default: <data_dir>/downloads/manual)")
    parser.add_argument("--download", action="store_true",
                        help="download the archives that the manual dir lacks")
    parser.add_argument("--download_dir", default=None,
                        help="downloads and temporary files (default: <data_dir>/downloads)")
    return parser.parse_args(argv)


def check_places(args: argparse.Namespace) -> None:
    """`outputs.OutputError` naming the flag for a data / download dir that cannot be
    written or a manual dir that is a file (local paths; buckets are not checked)."""
    for flag, path in (("--data_dir", args.data_dir), ("--download_dir", args.download_dir)):
        if path and "://" not in path:
            outputs.check_dir(os.path.expanduser(path), flag)
    manual = os.path.expanduser(args.manual_dir or "")
    if manual and os.path.exists(manual) and not os.path.isdir(manual):
        raise outputs.OutputError(f"--manual_dir={manual} is a file; give the folder that "
                                  f"holds VOCtrainval_11-May-2012.tar and benchmark.tgz")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    # Imported here so that `--help` is quick and TensorFlow's start-up noise is less.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from scaleattn.data import voc  # pylint: disable=import-outside-toplevel

    tfds.enable_progress_bar()
    expand = lambda p: os.path.expanduser(p) if p else p
    try:
        check_places(args)
        builder = voc.prepare(expand(args.data_dir), expand(args.manual_dir),
                              download=args.download, download_dir=expand(args.download_dir))
    except (voc.VocDataError, outputs.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a place the checks could not foresee (a disk that filled up)
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return 1
    print(f"voc2012 {builder.version} in {builder.data_dir}")
    for split in SPLITS:
        print(f"  {split:10s} {builder.info.splits[split].num_examples:6d} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
