"""PASCAL VOC 2012 + SBD as a TFDS dataset (``voc2012``, version 1.0.0).

Splits:

* ``train``     — VOC 2012 ``ImageSets/Segmentation/train.txt`` (1,464 images);
* ``val``       — VOC 2012 ``ImageSets/Segmentation/val.txt`` (1,449 images);
* ``train_aug`` — VOC train ∪ SBD train ∪ SBD val − VOC val, de-duplicated by image
  id (10,582 images). An id that is in VOC train keeps its VOC mask (the official
  annotation, with 255 borders); the other ids use the SBD ``.mat`` label and the
  SBD copy of the image.

Features (shared with the demo dataset, read by the same tf.data pipeline):
``image`` uint8 ``[H, W, 3]`` RGB, ``segmentation`` uint8 ``[H, W, 1]`` class
indices (0..20, 255 = ignore), ``image_id`` text (e.g. ``2007_000032``).

Sources. Two archives, taken from the manual dir (``dl_manager.manual_dir``) or,
with ``Voc2012(download=True)``, downloaded by TFDS when absent there:
``VOCtrainval_11-May-2012.tar`` and SBD's ``benchmark.tgz``. Each archive is
md5-checked (chunked hashlib) against ``expected_md5``, a constructor argument
that defaults to the real checksums (`ARCHIVE_MD5`); tests that make their own
small archives pass their own md5s, or ``None`` to skip the check of an archive.

How archives are read. Each archive is read front to back, never extracted
whole: a first pass reads every tar header and checks that the archive ends with
the tar end-of-archive marker (and, for the ``.tgz``, with an intact gzip
trailer), so a truncated or corrupt archive is an error before anything is
written. A second pass copies only the members the splits need into a temporary
folder ``<download_dir>/voc2012_extract.<random>/`` (``download_dir`` defaults to
``<data_dir>/downloads``; about 1.5 GB for the real data), which is deleted when
the build ends, whether it succeeded or not.

Validation. Every malformed input raises `VocDataError` with one line,
``"<problem naming the file>. Fix: <what to do>"``: a missing archive, a wrong
md5, a truncated or corrupt archive, an empty or malformed split list, an image
or mask that a split list references but the archive lacks, an unreadable image,
mask or ``.mat``, a mask whose size differs from its image, label values outside
{0..20, 255}, and a ``data_dir`` that cannot be written. The last is checked
before anything starts.

Nothing half-built remains. TFDS writes into ``<data_dir>/voc2012/incomplete.*``
and renames it to ``1.0.0`` only at the end; on any exception
`Voc2012.download_and_prepare` also removes what the failed call left behind
(incomplete folders, and the folders it created that are still empty), so a
rerun after fixing the input needs no manual clean-up.

Build with ``python -m scaleattn.data.build --data_dir=... --manual_dir=...``
(or `prepare`). Reading needs this module imported, so that TFDS knows the name
``voc2012``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import PIL.Image
import scipy.io
import tensorflow_datasets as tfds

from scaleattn.config import VOC_IGNORE_LABEL
from scaleattn.data import buildlock, errors

NUM_CLASSES = 21
CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
ARCHIVE_URLS = {
    VOC_ARCHIVE: "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    SBD_ARCHIVE: ("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
                  "semantic_contours/benchmark.tgz"),
}
ARCHIVE_MD5 = {
    VOC_ARCHIVE: "6cd6e144f989b92b3379bac3b3de84fd",
    SBD_ARCHIVE: "82b4d87ceb2ed10f6038a1cba92111cb",
}

# Member paths inside the archives.
VOC_ROOT = "VOCdevkit/VOC2012"
VOC_LISTS = {"train": f"{VOC_ROOT}/ImageSets/Segmentation/train.txt",
             "val": f"{VOC_ROOT}/ImageSets/Segmentation/val.txt"}
SBD_ROOT = "benchmark_RELEASE/dataset"
SBD_LISTS = {"train": f"{SBD_ROOT}/train.txt", "val": f"{SBD_ROOT}/val.txt"}

BUILD_COMMAND = "python -m scaleattn.data.build --data_dir=DATA_DIR --manual_dir=MANUAL_DIR"

_LOG = logging.getLogger(__name__)
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
# What reading a damaged archive raises (gzip.BadGzipFile is an OSError).
_ARCHIVE_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class VocDataError(errors.DataError, ValueError):
    """A malformed or missing input; the message names the file and the fix."""


def _error(problem: str, fix: str) -> VocDataError:
    """The one-line error format: ``"<problem>. Fix: <fix>"``."""
    return VocDataError(f"{problem}. Fix: {fix}")


# ---------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------


def file_md5(path: os.PathLike | str) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _clean_member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


class TarArchive:
    """A ``.tar`` or gzip-compressed ``.tgz`` archive read front to back.

    Construction scans it (see `scan`); `extract` then copies members, named by
    their path inside the archive (e.g. ``VOCdevkit/VOC2012/JPEGImages/x.jpg``).
    """

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.members: set[str] = self.scan()

    def where(self, member: str) -> str:
        """How messages name a member: ``<archive path>:<member>``."""
        return f"{self.path}:{member}"

    def _damaged(self, detail: str) -> VocDataError:
        return _error(
            f"archive {self.path} is truncated or corrupt ({detail})",
            f"delete it and download {self.path.name} again "
            f"({ARCHIVE_URLS.get(self.path.name, 'see scaleattn/data/voc.py')})")

    def _open(self):
        """The decompressed byte stream (seekable; for gzip, seeking back re-reads)."""
        with open(self.path, "rb") as f:
            compressed = f.read(2) == _GZIP_MAGIC
        return gzip.open(self.path, "rb") if compressed else open(self.path, "rb")

    def scan(self) -> set[str]:
        """Reads all headers; returns the regular files' names.

        Raises `VocDataError` when the archive is unreadable, ends before its
        end-of-archive marker (two zero blocks), or has a bad gzip trailer.
        """
        try:
            with self._open() as raw:
                stream = _LastRead(raw)
                with tarfile.open(fileobj=stream, mode="r:") as tar:
                    names = {_clean_member_name(m.name) for m in tar.getmembers() if m.isfile()}
                end = tar.offset
                # tarfile stops quietly at a missing or garbled header; a complete
                # archive has its end-of-archive marker exactly there. The header
                # read that stopped tarfile is normally the latest read: use it
                # rather than seek back (which, in a gzip stream, re-reads it all).
                if stream.tell() == end + len(stream.last):
                    marker = stream.last + stream.read(2 * tarfile.BLOCKSIZE - len(stream.last))
                else:
                    stream.seek(end)
                    marker = stream.read(2 * tarfile.BLOCKSIZE)
                while stream.read(_CHUNK):  # to the end: gzip checks CRC and length
                    pass
        except _ARCHIVE_READ_ERRORS as e:
            raise self._damaged(f"{type(e).__name__}: {e}") from None
        if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
            raise self._damaged(f"no end-of-archive marker at byte {end}")
        return names

    def extract(self, names: set[str], dest: Path | None) -> dict[str, bytes]:
        """Copies members ``names`` to ``dest/<name>`` in one pass.

        With ``dest=None`` returns their bytes instead (keep that for small files).
        """
        found: dict[str, bytes] = {}
        try:
            with self._open() as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
                for info in tar:
                    name = _clean_member_name(info.name)
                    if name not in names or not info.isfile():
                        continue
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"{name}: short read")
                    if dest is None:
                        found[name] = data
                    else:
                        _write_file(dest / name, data)
                        found[name] = b""
                    if len(found) == len(names):
                        break
        except _ARCHIVE_READ_ERRORS as e:
            raise self._damaged(f"{type(e).__name__}: {e}") from None
        missing = sorted(set(names) - set(found))
        if missing:  # scan() saw them, so the archive changed under us
            raise self._damaged(f"{missing[0]} disappeared while reading")
        return found


class _LastRead:
    """A read-only file wrapper that keeps the bytes of the latest `read`."""

    def __init__(self, f):
        self._f = f
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        self.last = self._f.read(size)
        return self.last

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise _error(f"cannot write temporary file {path} ({e})",
                     "free disk space there, or pass another download_dir") from None


# ---------------------------------------------------------------------------
# Split lists and examples
# ---------------------------------------------------------------------------


def parse_split_list(text: str, where: str) -> list[str]:
    """Image ids of a split list, one per line; order kept, duplicates dropped."""
    ids: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if not _IMAGE_ID.match(image_id):
            raise _error(f"split list {where} line {number} is not an image id: {image_id!r}",
                         "restore the original list from the archive")
        ids[image_id] = None
    if not ids:
        raise _error(f"split list {where} is empty",
                     "restore the original list (one image id per line) from the archive")
    return list(ids)


@dataclasses.dataclass(frozen=True)
class Example:
    """Where one example's image and label are: members of ``archive``."""

    image_id: str
    archive: TarArchive
    image: str
    label: str
    list_name: str  # the split list that asked for it, for messages

    @property
    def is_sbd(self) -> bool:
        return self.label.endswith(".mat")


def voc_example(archive: TarArchive, image_id: str, list_name: str) -> Example:
    return Example(image_id, archive, f"{VOC_ROOT}/JPEGImages/{image_id}.jpg",
                   f"{VOC_ROOT}/SegmentationClass/{image_id}.png", list_name)


def sbd_example(archive: TarArchive, image_id: str, list_name: str) -> Example:
    return Example(image_id, archive, f"{SBD_ROOT}/img/{image_id}.jpg",
                   f"{SBD_ROOT}/cls/{image_id}.mat", list_name)


def check_members_present(examples: list[Example]) -> None:
    """Raises if a split list references a file its archive lacks."""
    for ex in examples:
        for member in (ex.image, ex.label):
            if member not in ex.archive.members:
                raise _error(
                    f"{ex.archive.where(member)} is missing, but split list "
                    f"{ex.archive.where(ex.list_name)} lists {ex.image_id}",
                    f"use the original, complete {ex.archive.path.name}")


def load_image(path: Path, where: str) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """An image for the ``image`` feature and its (height, width).

    An RGB JPEG or PNG is returned as its encoded bytes (stored as they are);
    anything else PIL reads is converted to an RGB uint8 array.
    """
    data = path.read_bytes()
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            size = (img.height, img.width)
            if img.mode == "RGB" and img.format in ("JPEG", "PNG"):
                return data, size
            return np.asarray(img.convert("RGB")), size
    except Exception as e:  # PIL raises many kinds on corrupt files
        raise _error(f"cannot decode image {where} ({type(e).__name__}: {e})",
                     "restore the original image from the archive") from None


def load_voc_label(path: Path, where: str) -> np.ndarray:
    """Class indices of a VOC palette PNG (PIL keeps a 'P' image's indices)."""
    try:
        with PIL.Image.open(path) as img:
            img.load()
            mode = img.mode
            label = np.array(img)
    except Exception as e:
        raise _error(f"cannot decode mask {where} ({type(e).__name__}: {e})",
                     "restore the original SegmentationClass PNG from the archive") from None
    if mode not in ("P", "L"):
        raise _error(f"mask {where} is a mode-{mode} image, not a palette PNG of class indices",
                     "use the original SegmentationClass PNGs (colours are not class ids)")
    return label


def load_sbd_label(path: Path, where: str) -> np.ndarray:
    """Class indices of an SBD ``cls/*.mat`` file (``GTcls.Segmentation``)."""
    try:
        label = np.asarray(scipy.io.loadmat(path)["GTcls"][0]["Segmentation"][0])
    except Exception as e:  # scipy raises ValueError, TypeError, KeyError, ... on bad files
        raise _error(f"cannot read SBD label {where} ({type(e).__name__}: {e})",
                     f"restore the original .mat file: re-download {SBD_ARCHIVE}") from None
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise _error(f"SBD label {where} is not a 2-D integer array "
                     f"(shape {label.shape}, dtype {label.dtype})",
                     f"restore the original .mat file: re-download {SBD_ARCHIVE}")
    return label


def check_label(label: np.ndarray, image_size: tuple[int, int], where: str,
                image_where: str) -> np.ndarray:
    """Checks size and values; returns the label as uint8 ``[H, W, 1]``."""
    if label.shape != image_size:
        raise _error(
            f"mask {where} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
            f"{image_where} is {image_size[1]}x{image_size[0]}",
            "restore the original mask and image; they must have the same size")
    values = np.unique(label)
    bad = values[((values < 0) | (values >= NUM_CLASSES)) & (values != VOC_IGNORE_LABEL)]
    if bad.size:
        raise _error(
            f"mask {where} has label values {bad[:5].tolist()} outside "
            f"0..{NUM_CLASSES - 1} and {VOC_IGNORE_LABEL}",
            "restore the original mask (values are class ids 0..20 and 255 = ignore)")
    return label.astype(np.uint8)[..., None]


# ---------------------------------------------------------------------------
# Clean-up helpers
# ---------------------------------------------------------------------------


def _is_local(path) -> bool:
    return "://" not in os.fspath(path)


def check_writable(path: Path, what: str) -> None:
    """Raises unless ``path`` (or the nearest existing folder above it) is writable."""
    if not _is_local(path):
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise _error(f"cannot write to the {what} {path} ({probe} is not a writable folder)",
                     f"pass a writable --{what}, or make {probe} writable")


def _remove_empty_folders(root: Path) -> None:
    """Removes ``root`` and the folders in it, as far as they hold no files."""
    if not root.is_dir():
        return
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty: keep


# ---------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------


class Voc2012(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 segmentation with the SBD ``train_aug`` split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train, val and train_aug (VOC 2012 + SBD)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {VOC_ARCHIVE} ({ARCHIVE_URLS[VOC_ARCHIVE]}) and {SBD_ARCHIVE} "
        f"({ARCHIVE_URLS[SBD_ARCHIVE]}) in the manual dir, or build with --download.")

    def __init__(self, *, expected_md5: Mapping[str, str | None] | None = None,
                 download: bool = False, **kwargs):
        """Args:
          expected_md5: archive name -> md5 hex digest, or None to skip that
            archive's check. Default: `ARCHIVE_MD5`, the real archives' md5s.
            Must name exactly `VOC_ARCHIVE` and `SBD_ARCHIVE`.
          download: download an archive from `ARCHIVE_URLS` (through TFDS) when
            the manual dir lacks it.
          **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (data_dir, ...).
        """
        md5 = dict(ARCHIVE_MD5 if expected_md5 is None else expected_md5)
        if set(md5) != set(ARCHIVE_MD5):
            raise ValueError(f"expected_md5 must have exactly the keys {sorted(ARCHIVE_MD5)}, "
                             f"got {sorted(md5)}")
        self._expected_md5 = md5
        self._download = download
        self._extract_dir: Path | None = None  # set while a build runs
        self._manual_dir: Path | None = None  # set by download_and_prepare
        super().__init__(**kwargs)
        self._original_state.update(expected_md5=expected_md5, download=download)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="PASCAL VOC 2012 semantic segmentation; train_aug adds SBD.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "segmentation": tfds.features.Image(shape=(None, None, 1)),
                "image_id": tfds.features.Text(),
            }),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        )

    # -- preparing, with pre-flight checks and clean-up ----------------------------

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """TFDS's `download_and_prepare`, plus a write check first and a clean-up.

        On any exception removes what this call left: incomplete TFDS folders and
        the folders it created that hold no files; the exception is re-raised.
        """
        overwrite = download_config is not None and download_config.download_mode.overwrite_dataset
        if self.data_path.exists() and not overwrite:  # prepared already: TFDS reuses it
            return super().download_and_prepare(
                download_dir=download_dir, download_config=download_config, **kwargs)
        data_root = Path(os.fspath(self.data_dir_root))
        download_dir = Path(os.fspath(download_dir or data_root / "downloads"))
        # TFDS's rule for the manual dir; kept to name it when it is absent.
        manual_dir = download_config.manual_dir if download_config else None
        self._manual_dir = Path(os.fspath(manual_dir or download_dir / "manual"))
        check_writable(data_root, "data_dir")
        check_writable(download_dir, "download_dir")
        dataset_dir = Path(os.fspath(self.data_path)).parent  # <data_dir>/voc2012
        created = [p for p in (download_dir, dataset_dir, data_root) if not p.exists()]
        incomplete_before = set(dataset_dir.glob("incomplete*")) if dataset_dir.exists() else set()
        try:
            super().download_and_prepare(
                download_dir=download_dir, download_config=download_config, **kwargs)
        except BaseException:
            for leftover in set(dataset_dir.glob("incomplete*")) - incomplete_before:
                shutil.rmtree(leftover, ignore_errors=True)
            raise
        finally:
            for folder in created:  # e.g. TFDS's empty downloads/extracted
                _remove_empty_folders(folder)

    def _download_and_prepare(self, dl_manager, download_config=None):
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if self._extract_dir is not None:
                shutil.rmtree(self._extract_dir, ignore_errors=True)
                self._extract_dir = None

    # -- sources -------------------------------------------------------------------

    def _archive_paths(self, dl_manager) -> dict[str, Path]:
        """Finds (or downloads) both archives; one message names all missing ones."""
        try:
            manual_dir = Path(os.fspath(dl_manager.manual_dir))
        except (AssertionError, ValueError):  # TFDS: the manual dir is absent or empty
            manual_dir = self._manual_dir
        paths, missing = {}, []
        for name, url in ARCHIVE_URLS.items():
            if (manual_dir / name).is_file():
                paths[name] = manual_dir / name
            elif self._download:
                try:
                    paths[name] = Path(os.fspath(dl_manager.download(url)))
                except Exception as e:  # network errors come in many kinds
                    raise _error(f"cannot download {url} ({type(e).__name__}: {e})",
                                 f"download it by hand into {manual_dir}/{name}") from None
            else:
                missing.append(name)
        if missing:
            raise _error(
                f"missing archive(s) {', '.join(missing)}: expected in the manual dir {manual_dir}",
                f"download them there ({'; '.join(ARCHIVE_URLS[n] for n in missing)}) and run "
                f"{BUILD_COMMAND}, or add --download to let the build fetch them")
        return paths

    def _verify_md5(self, name: str, path: Path) -> None:
        expected = self._expected_md5[name]
        if expected is None:
            return
        _LOG.info("Checking the md5 of %s", path)
        actual = file_md5(path)
        if actual != expected.lower():
            raise _error(f"archive {path} has md5 {actual}, expected {expected} for {name}",
                         f"delete it and download {name} again ({ARCHIVE_URLS[name]})")

    def _split_generators(self, dl_manager):
        paths = self._archive_paths(dl_manager)
        for name, path in paths.items():
            self._verify_md5(name, path)
        _LOG.info("Checking that the archives are complete")
        voc, sbd = TarArchive(paths[VOC_ARCHIVE]), TarArchive(paths[SBD_ARCHIVE])

        lists = {}
        for archive, members in ((voc, VOC_LISTS), (sbd, SBD_LISTS)):
            for split, member in members.items():
                if member not in archive.members:
                    raise _error(f"split list {archive.where(member)} is missing",
                                 f"use the original, complete {archive.path.name}")
            texts = archive.extract(set(members.values()), dest=None)
            for split, member in members.items():
                lists[archive, split] = parse_split_list(
                    texts[member].decode("utf-8", errors="replace"), archive.where(member))

        splits = {
            "train": [voc_example(voc, i, VOC_LISTS["train"]) for i in lists[voc, "train"]],
            "val": [voc_example(voc, i, VOC_LISTS["val"]) for i in lists[voc, "val"]],
        }
        in_voc = {ex.image_id for ex in splits["train"] + splits["val"]}
        from_sbd = {}
        for split in ("train", "val"):
            for image_id in lists[sbd, split]:
                if image_id not in in_voc:
                    from_sbd.setdefault(image_id, sbd_example(sbd, image_id, SBD_LISTS[split]))
        splits["train_aug"] = sorted(splits["train"] + list(from_sbd.values()),
                                     key=lambda ex: ex.image_id)

        every = splits["val"] + splits["train_aug"]
        check_members_present(every)
        download_dir = Path(os.fspath(dl_manager.download_dir))
        download_dir.mkdir(parents=True, exist_ok=True)
        self._extract_dir = Path(tempfile.mkdtemp(prefix="voc2012_extract.", dir=download_dir))
        for archive in (voc, sbd):
            wanted = {m for ex in every if ex.archive is archive for m in (ex.image, ex.label)}
            _LOG.info("Extracting %d files from %s to %s", len(wanted), archive.path,
                      self._extract_dir)
            archive.extract(wanted, dest=self._extract_dir)
        return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples: list[Example]) -> Iterator[tuple[str, dict]]:
        for ex in examples:
            image_where, label_where = ex.archive.where(ex.image), ex.archive.where(ex.label)
            image, size = load_image(self._extract_dir / ex.image, image_where)
            load_label = load_sbd_label if ex.is_sbd else load_voc_label
            label = load_label(self._extract_dir / ex.label, label_where)
            label = check_label(label, size, label_where, image_where)
            yield ex.image_id, {"image": image, "segmentation": label, "image_id": ex.image_id}


def prepare(data_dir: os.PathLike | str, manual_dir: os.PathLike | str | None = None, *,
            download: bool = False, download_dir: os.PathLike | str | None = None,
            expected_md5: Mapping[str, str | None] | None = None) -> Voc2012:
    """Builds ``voc2012`` under ``data_dir`` (if not built yet); returns the builder."""
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir else None)
    check_writable(Path(data_dir), "data_dir")  # before the lock file is made there
    with buildlock.held(os.fspath(data_dir), "voc2012"):  # one build at a time
        builder = Voc2012(data_dir=os.fspath(data_dir), expected_md5=expected_md5,
                          download=download)
        builder.download_and_prepare(
            download_dir=os.fspath(download_dir) if download_dir else None,
            download_config=config)
    return builder
