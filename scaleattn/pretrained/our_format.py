"""Our converted weight files, and the error every part of `scaleattn.pretrained` raises.

A converted file is one msgpack blob (flax.serialization) of nested dicts::

    {'meta': {'format': FORMAT, 'arch', 'source', 'src', 'input_channels',
              'input_mean' [3], 'input_std' [3], 'stride_in_1x1'},
     'params': {'backbone': {...}, 'largefov': {'fc6', 'fc7'}},   # largefov: vgg16 only
     'batch_stats': {'backbone': {...}}}                            # ResNets only

with float32 arrays as leaves (shapes: `pretrained.target_shapes`). `save_pretrained`
writes it (what ``python -m scaleattn.convert`` produces), `read_pretrained` reads it
back and refuses files without the ``FORMAT`` tag.
"""

import os
from typing import Mapping

from flax import serialization

from scaleattn import outputs

FORMAT = "scaleattn.pretrained/1"


class WeightsError(ValueError):
    """A weight file that cannot be used; the message names the file and the key."""


def save_pretrained(path: str, tree: Mapping) -> None:
    """Writes a converted ``tree`` (``meta``, ``params``, ``batch_stats``) to ``path`` as
    msgpack, through a temporary file so that a crash leaves no half-written ``path``."""
    blob = serialization.msgpack_serialize(dict(tree))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    outputs.atomic_write(path, blob)  # the temporary file goes on any failure


def read_pretrained(path: str) -> dict:
    """A file written by `save_pretrained` -> ``{'meta', 'params', 'batch_stats'}``
    (nested dicts of numpy arrays; ``batch_stats`` is ``{}`` for VGG16)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise WeightsError(f"model.init_from={path!r} does not exist; convert ImageNet "
                           f"weights first: python -m scaleattn.convert --from=... --arch=... "
                           f"SRC {path}")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        tree = serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several unrelated types
        raise WeightsError(f"{path}: not a converted weight file or truncated "
                           f"({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict) or tree.get("meta", {}).get("format") != FORMAT:
        raise WeightsError(f"{path}: not written by `python -m scaleattn.convert` "
                           f"(no {FORMAT!r} meta)")
    tree.setdefault("batch_stats", {})
    return tree
