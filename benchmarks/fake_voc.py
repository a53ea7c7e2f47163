"""Synthetic PASCAL VOC 2012 + SBD archives, for tests and benchmarks.

No machine of this project can reach the internet, so nothing here can fetch the
real ``VOCtrainval_11-May-2012.tar`` and ``benchmark.tgz``. This module writes
look-alikes that the real `scaleattn.data.voc.Voc2012` builder reads unchanged:
the real member paths (``VOCdevkit/VOC2012/JPEGImages``, ``SegmentationClass``,
``ImageSets/Segmentation``, ``benchmark_RELEASE/dataset/{img,cls}``), palette PNG
masks, SBD ``.mat`` labels in the ``GTcls`` struct layout, split lists, and the
two archives made with `tarfile` (a plain ``.tar`` and a gzip ``.tgz``). Their
md5s are not the real ones: build with ``expected_md5`` set to `pack`'s result,
or to `NO_MD5_CHECK`.

Two levels:

* Primitives (`png_bytes`, `jpeg_bytes`, `mat_bytes`,
  `list_bytes`, the member paths `voc_jpeg` ... `sbd_list`, `archive_contents`,
  `pack`, `write_tree`): the tests' tiny hand-made trees (tests/test_voc.py)
  use these with their own ids, colours and masks, and break single members.
* A realistic generator (`synthetic_contents`, `write_archives`,
  `build_synthetic`) for benchmarks: N images of a given size (default 500x375,
  the usual VOC size), JPEG quality 90, with smooth multi-octave noise
  ("natural-ish" content, ~50 KB per 500x375 JPEG) so decoding costs about what a
  real photo costs; masks hold 1-4 objects of random classes with 255 borders
  (VOC) or without (SBD), and the objects are tinted into the image.
  Everything is deterministic: example ``i`` depends only on (seed, its id),
  never on the order or number of examples generated.

Archive contents are ``{archive name: {member path: bytes or a zero-argument
callable returning bytes}}``; callables are called while packing, so a large
synthetic set is never held in memory at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.io

from scaleattn import viz
from scaleattn.config import VOC_IGNORE_LABEL
from scaleattn.data import voc
from scaleattn.data.voc import (NUM_CLASSES, SBD_ARCHIVE, SBD_LISTS, SBD_ROOT,
                                VOC_ARCHIVE, VOC_LISTS, VOC_ROOT)

VOC_SIZE = (500, 375)  # (width, height) of most VOC 2012 images
JPEG_QUALITY = 90
NO_MD5_CHECK = {VOC_ARCHIVE: None, SBD_ARCHIVE: None}  # expected_md5 that skips the checks
# Share of VOC train in train_aug in the real data (1,464 of 10,582); the rest is SBD.
VOC_TRAIN_SHARE = 1464 / 10582

Member = Union[bytes, Callable[[], bytes]]
Contents = dict[str, dict[str, Member]]


# ---------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------


def png_bytes(mask: np.ndarray) -> bytes:
    """A VOC ``SegmentationClass`` PNG: palette ("P") image whose indices are ``mask``."""
    buf = io.BytesIO()
    viz.mask_image(mask).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """An RGB uint8 ``[H, W, 3]`` array as JPEG bytes."""
    buf = io.BytesIO()
    PIL.Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=quality)
    return buf.getvalue()


def mat_bytes(label: np.ndarray) -> bytes:
    """An SBD ``cls`` file: loadmat(f)['GTcls'][0]['Segmentation'][0] is ``label``."""
    gtcls = {"Segmentation": label, "Boundaries": np.zeros((1, 20), object),
             "CategoriesPresent": np.unique(label[label > 0]).astype(np.uint8)}
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": gtcls})
    return buf.getvalue()


def list_bytes(ids: Iterable[str]) -> bytes:
    """A split list: one image id per line."""
    return "".join(f"{i}\n" for i in ids).encode()


def voc_jpeg(image_id: str) -> str:
    return f"{VOC_ROOT}/JPEGImages/{image_id}.jpg"


def voc_png(image_id: str) -> str:
    return f"{VOC_ROOT}/SegmentationClass/{image_id}.png"


def sbd_jpeg(image_id: str) -> str:
    return f"{SBD_ROOT}/img/{image_id}.jpg"


def sbd_mat(image_id: str) -> str:
    return f"{SBD_ROOT}/cls/{image_id}.mat"


def voc_list(split: str) -> str:
    """``train`` or ``val`` split list of the VOC archive."""
    return VOC_LISTS[split]


def sbd_list(split: str) -> str:
    """``train`` or ``val`` split list of the SBD archive."""
    return SBD_LISTS[split]


def archive_contents(voc_train: list[str], voc_val: list[str], sbd_train: list[str],
                     sbd_val: list[str], *, voc_image: Callable[[str], Member],
                     voc_mask: Callable[[str], Member], sbd_image: Callable[[str], Member],
                     sbd_label: Callable[[str], Member]) -> Contents:
    """The two archives' members for the given split lists.

    Every listed id gets its image and label in the archive of its list; the
    callables map an id to a member's bytes (or to a callable producing them).
    """
    voc_files: dict[str, Member] = {voc_list("train"): list_bytes(voc_train),
                                    voc_list("val"): list_bytes(voc_val)}
    for image_id in dict.fromkeys(voc_train + voc_val):
        voc_files[voc_jpeg(image_id)] = voc_image(image_id)
        voc_files[voc_png(image_id)] = voc_mask(image_id)
    sbd_files: dict[str, Member] = {sbd_list("train"): list_bytes(sbd_train),
                                    sbd_list("val"): list_bytes(sbd_val)}
    for image_id in dict.fromkeys(sbd_train + sbd_val):
        sbd_files[sbd_jpeg(image_id)] = sbd_image(image_id)
        sbd_files[sbd_mat(image_id)] = sbd_label(image_id)
    return {VOC_ARCHIVE: voc_files, SBD_ARCHIVE: sbd_files}


def _member_bytes(data: Member) -> bytes:
    return data() if callable(data) else data


def pack(contents: Contents, manual_dir: os.PathLike | str) -> dict[str, str]:
    """Writes the ``.tar`` and the ``.tgz`` into ``manual_dir``; returns their md5s."""
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, mode in ((VOC_ARCHIVE, "w"), (SBD_ARCHIVE, "w:gz")):
        path = manual_dir / name
        with tarfile.open(path, mode) as tar:
            for member, data in contents[name].items():
                data = _member_bytes(data)
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        md5[name] = digest.hexdigest()
    return md5


def write_tree(contents: Contents, root: os.PathLike | str) -> Path:
    """Writes the members as files under ``root`` (the archives, extracted)."""
    root = Path(root)
    for files in contents.values():
        for member, data in files.items():
            path = root / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_member_bytes(data))
    return root


# ---------------------------------------------------------------------------
# Realistic synthetic examples
# ---------------------------------------------------------------------------


def _rng(seed: int, image_id: str, stream: int) -> np.random.Generator:
    """A generator fixed by (seed, image id, stream), independent of call order."""
    id_key = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, id_key, stream])


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                  channels: int) -> np.ndarray:
    """Unit normal noise on a coarse grid (``cells`` along the long side), upsampled."""
    long_side = max(height, width)
    grid_h = max(2, round(height * cells / long_side))
    grid_w = max(2, round(width * cells / long_side))
    grid = rng.standard_normal((channels, grid_h, grid_w), dtype=np.float32)
    return np.stack([np.asarray(PIL.Image.fromarray(g).resize((width, height),
                                                              PIL.Image.BILINEAR))
                     for g in grid], axis=-1)


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Photo-like RGB uint8 ``[height, width, 3]``: multi-octave smooth noise.

    Mostly luminance structure from coarse to fine, smoother colour variation
    and a little sensor-like grain, so a JPEG of it is about as large (and as
    slow to decode) as a real photo of that size.
    """
    image = rng.uniform(70, 170, 3).astype(np.float32) + np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 45.0), (12, 25.0), (48, 14.0), (160, 10.0)):
        image += amplitude * _smooth_noise(rng, height, width, cells, 1)
    image += 30.0 * _smooth_noise(rng, height, width, 6, 3)
    image += 8.0 * _smooth_noise(rng, height, width, 40, 3)
    image += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def object_layout(rng: np.random.Generator, height: int, width: int, *,
                  max_objects: int = 4, border: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random objects: (classes uint8 ``[H, W]``, 0 = background; border bool ``[H, W]``).

    1..max_objects ellipses, rectangles or triangles of classes 1..20, 15-70 % of
    the image side, later ones in front. ``border`` marks a band of about
    ``border`` pixels along every visible outline (where VOC puts 255).
    """
    classes = PIL.Image.new("L", (width, height), 0)
    edges = PIL.Image.new("1", (width, height), 0)
    draw_classes, draw_edges = PIL.ImageDraw.Draw(classes), PIL.ImageDraw.Draw(edges)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        class_id = int(rng.integers(1, NUM_CLASSES))
        box_w = int(width * rng.uniform(0.15, 0.7))
        box_h = int(height * rng.uniform(0.15, 0.7))
        x0 = int(rng.integers(-box_w // 4, width - box_w // 2))
        y0 = int(rng.integers(-box_h // 4, height - box_h // 2))
        box = (x0, y0, x0 + box_w, y0 + box_h)
        width_px = max(border, 1)
        shape = int(rng.integers(3))
        # An object in front hides the outlines behind it: clear them, draw its own.
        if shape == 0:
            draw_classes.ellipse(box, fill=class_id)
            draw_edges.ellipse(box, fill=0, outline=1, width=width_px)
        elif shape == 1:
            draw_classes.rectangle(box, fill=class_id)
            draw_edges.rectangle(box, fill=0, outline=1, width=width_px)
        else:
            points = [(x0 + box_w // 2, y0), (x0 + box_w, y0 + box_h), (x0, y0 + box_h)]
            draw_classes.polygon(points, fill=class_id)
            draw_edges.polygon(points, fill=0)
            draw_edges.line(points + points[:1], fill=1, width=width_px)
    return np.array(classes), np.array(edges, dtype=bool) & (border > 0)


def synthetic_masks(image_id: str, height: int, width: int, *, seed: int = 0,
                    border: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(VOC mask with 255 borders, SBD label without them) of an id, uint8 ``[H, W]``."""
    classes, edges = object_layout(_rng(seed, image_id, 0), height, width, border=border)
    voc_mask = classes.copy()
    voc_mask[edges] = VOC_IGNORE_LABEL
    return voc_mask, classes


def synthetic_image(image_id: str, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """The RGB uint8 ``[H, W, 3]`` image of an id: `natural_image` with its objects tinted in.

    Each class has its own tint, so image and masks agree.
    """
    classes = synthetic_masks(image_id, height, width, seed=seed, border=0)[1]
    rng = _rng(seed, image_id, 1)
    image = natural_image(rng, height, width).astype(np.float32)
    tints = rng.uniform(0, 255, (NUM_CLASSES, 3)).astype(np.float32)
    objects = classes > 0
    image[objects] = 0.45 * image[objects] + 0.55 * tints[classes[objects]]
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_splits(num_train_aug: int, num_val: int) -> dict[str, list[str]]:
    """Split lists of a synthetic set: ``voc_train``, ``voc_val``, ``sbd_train``, ``sbd_val``.

    train_aug gets ``num_train_aug`` ids: about 14 % VOC train (as in the real
    data, at least one), the rest SBD only. The SBD lists also name the first
    VOC train id and the first VOC val id, as the real lists do, so the
    builder's de-duplication runs.
    """
    if num_train_aug < 1 or num_val < 1:
        raise ValueError(f"need at least one train_aug and one val image, got "
                         f"{num_train_aug} and {num_val}")
    num_voc_train = max(1, round(num_train_aug * VOC_TRAIN_SHARE))
    voc_train = [f"2007_{i:06d}" for i in range(num_voc_train)]
    voc_val = [f"2008_{i:06d}" for i in range(num_val)]
    sbd_only = [f"2009_{i:06d}" for i in range(num_train_aug - num_voc_train)]
    return {"voc_train": voc_train, "voc_val": voc_val,
            "sbd_train": sbd_only[0::2] + voc_train[:1],
            "sbd_val": sbd_only[1::2] + voc_val[:1]}


def synthetic_contents(num_train_aug: int, num_val: int, *,
                       size: tuple[int, int] = VOC_SIZE, seed: int = 0,
                       quality: int = JPEG_QUALITY, border: int = 3) -> Contents:
    """Archive contents of a synthetic VOC + SBD (see `synthetic_splits`).

    Members are callables (generated while packing). Every image is ``size``
    (width, height); an id in both archives has the same image in both.
    """
    width, height = size
    splits = synthetic_splits(num_train_aug, num_val)

    def image(image_id):
        return lambda: jpeg_bytes(synthetic_image(image_id, height, width, seed=seed), quality)

    def masks(image_id):
        return synthetic_masks(image_id, height, width, seed=seed, border=border)

    return archive_contents(
        splits["voc_train"], splits["voc_val"], splits["sbd_train"], splits["sbd_val"],
        voc_image=image, sbd_image=image,
        voc_mask=lambda i: lambda: png_bytes(masks(i)[0]),
        sbd_label=lambda i: lambda: mat_bytes(masks(i)[1]))


def write_archives(manual_dir: os.PathLike | str, num_train_aug: int, num_val: int, *,
                   size: tuple[int, int] = VOC_SIZE, seed: int = 0,
                   quality: int = JPEG_QUALITY) -> dict[str, str]:
    """Writes both synthetic archives into ``manual_dir``; returns their md5s."""
    return pack(synthetic_contents(num_train_aug, num_val, size=size, seed=seed,
                                   quality=quality), manual_dir)


def build_synthetic(data_dir: os.PathLike | str, manual_dir: os.PathLike | str,
                    num_train_aug: int, num_val: int, *, size: tuple[int, int] = VOC_SIZE,
                    seed: int = 0, quality: int = JPEG_QUALITY):
    """Writes the synthetic archives and builds ``voc2012`` from them with the real builder.

    Returns the `scaleattn.data.voc.Voc2012` builder (prepared in ``data_dir``).
    The md5 checks are skipped (`NO_MD5_CHECK`); the archive-structure checks run.
    """
    write_archives(manual_dir, num_train_aug, num_val, size=size, seed=seed, quality=quality)
    return voc.prepare(data_dir, manual_dir, expected_md5=NO_MD5_CHECK)
