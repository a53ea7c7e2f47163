"""ImageNet weights (torchvision or Keras) -> a parameter file for ``config.model.init_from``.

    python -m scaleattn.convert --from=torchvision|keras --arch=ARCH SRC DST

reads SRC (a torchvision ``.pth`` / ``.safetensors`` state dict, or a Keras ``.h5`` /
``.keras`` file; no PyTorch or TensorFlow needed), converts the backbone (for ``vgg16``
also DeepLab-LargeFOV's fc6/fc7), folds the input normalisation of ``--mean`` /
``--std`` into the first conv and writes DST, which ``config.model.init_from=DST``
loads into a fresh run. This module is the command line only; the work is done in
`scaleattn.pretrained` (`pretrained.conversion` explains the conversion leaf by leaf).
"""

import argparse
import sys
from typing import Sequence

from scaleattn import config as config_lib
from scaleattn import outputs, pretrained
from scaleattn.config import IMAGENET_MEAN, IMAGENET_STD


def _triple(key: str):
    """An argparse ``type`` for ``--mean`` / ``--std``: 'a,b,c' -> (a, b, c), checked
    against the range of ``config.<key>`` (`config.RANGES`), the values a run accepts."""
    def parse(text: str) -> tuple[float, float, float]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"need 3 comma-separated RGB numbers, got "
                                             f"{text!r}") from None
        if not config_lib.RANGES[key].holds(values):
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: it must be {config_lib.RANGES[key].describe()} "
                f"(as config.{key})")
        return values
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line -> ``source``, ``arch``, ``mean``, ``std`` (RGB triples), ``src``,
    ``dst``."""
    p = argparse.ArgumentParser(
        prog="python -m scaleattn.convert",
        description="Convert ImageNet weights (torchvision .pth/.safetensors or Keras "
                    ".h5/.keras) into a parameter file for config.model.init_from.")
    p.add_argument("--from", dest="source", required=True, choices=pretrained.SOURCES,
                   help="the framework SRC comes from")
    p.add_argument("--arch", required=True, choices=pretrained.ARCHS, help="the backbone")
    p.add_argument("--mean", type=_triple("data.mean"), default=IMAGENET_MEAN,
                   help="config.data.mean the run will use (RGB, 0..255; default ImageNet's)")
    p.add_argument("--std", type=_triple("data.std"), default=IMAGENET_STD,
                   help="config.data.std the run will use (RGB, 0..255; default ImageNet's)")
    p.add_argument("src", help="source weights file")
    p.add_argument("dst", help="output file (msgpack), for config.model.init_from")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Converts SRC into DST and prints what was converted and the flags to use; returns
    the exit status (1, with one ``error:`` line on stderr, when SRC or DST is unusable)."""
    args = parse_args(argv)
    try:
        outputs.check_file(args.dst, "DST", missing_folder_ok=True)  # before the work
        outputs.check_not_over(args.dst, "DST", inputs=[args.src])
        report = pretrained.convert_file(args.src, args.dst, source=args.source,
                                         arch=args.arch, mean=args.mean, std=args.std)
    except (pretrained.WeightsError, outputs.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the disk filled up while writing DST
        print(f"error: cannot write DST={args.dst}: {e.strerror or e}", file=sys.stderr)
        return 1
    ignored = report["ignored"]
    counters = [k for k in ignored if k.endswith("num_batches_tracked")]
    shown = [k for k in ignored if k not in counters] + (
        [f"{len(counters)} x num_batches_tracked"] if counters else [])
    print(f"{args.src} ({args.source} {args.arch}) -> {args.dst}: {report['arrays']} arrays, "
          f"{report['parameters'] / 1e6:.2f}M values.")
    print(f"  not converted (not backbone): {', '.join(shown) or 'nothing'}")
    if report["skipped"]:
        print(f"  SRC has no fc layers: fc6/fc7 will be initialised fresh "
              f"({', '.join(report['skipped'])})")
    print(f"  expects RGB input normalised with data.mean={tuple(args.mean)}, "
          f"data.std={tuple(args.std)}")
    flags = [f"--config.model.init_from={args.dst}"]
    if args.arch != "vgg16":
        flags.append(f"--config.model.stride_in_1x1={args.source == 'keras'}")
    print(f"  use: {' '.join(flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
