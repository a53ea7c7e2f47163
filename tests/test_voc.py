"""The ``voc2012`` TFDS builder on a tiny VOC-shaped tree made on the fly.

The tree has the real folder names: palette PNG masks, JPEG images, SBD ``.mat``
labels in the ``GTcls`` struct layout and the split lists, packed into the two
archives with `tarfile` (the writers are `benchmarks.fake_voc`'s; the ids,
colours and masks are this file's). The archives' md5s are the tests' own
(passed through ``expected_md5``). Each bad-input test breaks one thing, checks
the one-line message names the file, that nothing is left in ``data_dir``, and
that a rerun with the input fixed builds the dataset.
"""

import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from scaleattn.data import voc
from benchmarks.fake_voc import (archive_contents, jpeg_bytes, mat_bytes, pack, png_bytes,
                                     sbd_jpeg, sbd_mat, voc_jpeg, voc_png)
from scaleattn.viz import voc_palette
from scaleattn.data.voc import SBD_ARCHIVE, SBD_ROOT, VOC_ARCHIVE, VOC_ROOT, VocDataError

tfds.disable_progress_bar()

HEIGHT, WIDTH = 16, 20
VOC_TRAIN = ["2007_000001", "2007_000002", "2007_000003"]
VOC_VAL = ["2007_000011", "2007_000012"]
# SBD overlaps: 000001/000002 are in VOC train (keep the VOC mask), 000011/000012
# are in VOC val (excluded from train_aug), 000002 is listed twice.
SBD_TRAIN = ["2007_000001", "2007_000011", "2008_000021", "2007_000002"]
SBD_VAL = ["2007_000002", "2008_000022", "2007_000012"]
SBD_ONLY = ["2008_000021", "2008_000022"]
TRAIN_AUG = sorted(VOC_TRAIN + SBD_ONLY)


@pytest.fixture(scope="module", autouse=True)
def _temp_files_in_pytest_dir(tmp_path_factory):
    """TFDS leaves an empty ``mkdtemp`` folder per builder made: keep them in pytest's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tempfile")))
        yield


# ---------------------------------------------------------------------------
# The tiny tree
# ---------------------------------------------------------------------------


def image_number(image_id: str) -> int:
    return int(image_id.split("_")[1])


def image_colour(image_id: str) -> tuple[int, int, int]:
    """A flat, per-id colour, far enough apart to survive JPEG."""
    n = image_number(image_id)
    return (40 * (n % 5) + 30, 60 * (n % 4) + 20, 200 - 50 * (n % 3))


def voc_mask(image_id: str) -> np.ndarray:
    """A rectangle of one class with a 1-pixel 255 border, on background."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[3:13, 4:16] = 255
    mask[4:12, 5:15] = image_number(image_id) % 20 + 1
    return mask


def sbd_mask(image_id: str) -> np.ndarray:
    """A different rectangle and class than the VOC mask; no 255 (like SBD)."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[2:10, 2:18] = (image_number(image_id) + 7) % 20 + 1
    return mask


def flat_jpeg(image_id: str) -> bytes:
    return jpeg_bytes(np.full((HEIGHT, WIDTH, 3), image_colour(image_id), np.uint8), quality=95)


def make_contents() -> dict[str, dict[str, bytes]]:
    """Archive name -> {member path: bytes}; tests break it before packing."""
    contents = archive_contents(
        VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL,
        voc_image=flat_jpeg, voc_mask=lambda i: png_bytes(voc_mask(i)),
        sbd_image=flat_jpeg, sbd_label=lambda i: mat_bytes(sbd_mask(i)))
    contents[VOC_ARCHIVE][voc_jpeg("2012_000099")] = flat_jpeg("2012_000099")  # in no list
    return contents


def build(tmp_path, contents, data_dir=None, **md5_overrides):
    """Packs ``contents`` and builds; ``md5_overrides`` replace expected md5s."""
    md5 = pack(contents, tmp_path / "manual")
    md5.update(md5_overrides)
    return voc.prepare(data_dir or tmp_path / "data", tmp_path / "manual", expected_md5=md5)


def read_split(builder, split) -> dict[str, dict]:
    examples = tfds.as_numpy(builder.as_dataset(split=split))
    return {ex["image_id"].decode(): ex for ex in examples}


# ---------------------------------------------------------------------------
# A good build
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("good")
    builder = build(tmp_path, make_contents())
    return tmp_path, builder, {s: read_split(builder, s) for s in ("train", "val", "train_aug")}


def test_split_counts(built):
    _, builder, splits = built
    counts = {s: builder.info.splits[s].num_examples for s in ("train", "val", "train_aug")}
    assert counts == {"train": 3, "val": 2, "train_aug": 5}
    assert {s: len(v) for s, v in splits.items()} == counts


def test_features_are_the_shared_ones(built):
    _, builder, _ = built
    features = builder.info.features
    assert set(features) == {"image", "segmentation", "image_id"}
    assert features["image"].shape == (None, None, 3)
    assert features["segmentation"].shape == (None, None, 1)
    assert features["image"].np_dtype == features["segmentation"].np_dtype == np.uint8


def test_image_ids_per_split(built):
    _, _, splits = built
    assert sorted(splits["train"]) == sorted(VOC_TRAIN)
    assert sorted(splits["val"]) == sorted(VOC_VAL)
    # De-duplicated union of VOC train and SBD train+val, without VOC val.
    assert sorted(splits["train_aug"]) == TRAIN_AUG
    assert not set(splits["train_aug"]) & set(VOC_VAL)


def test_images_belong_to_their_ids(built):
    _, _, splits = built
    for split in splits.values():
        for image_id, ex in split.items():
            assert ex["image"].shape == (HEIGHT, WIDTH, 3) and ex["image"].dtype == np.uint8
            mean = ex["image"].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(mean, image_colour(image_id), atol=6)


def test_voc_masks_decode_to_palette_indices(built):
    """Stored labels are the PNG's indices (255 borders kept), not its colours."""
    tmp_path, _, splits = built
    palette = voc_palette()
    for split in ("train", "val"):
        for image_id, ex in splits[split].items():
            seg = ex["segmentation"]
            assert seg.shape == (HEIGHT, WIDTH, 1) and seg.dtype == np.uint8
            np.testing.assert_array_equal(seg[..., 0], voc_mask(image_id))
            assert {0, 255} < set(np.unique(seg).tolist())
            # Mapping the indices through the palette gives the PNG's colours.
            png = make_contents()[VOC_ARCHIVE][voc_png(image_id)]
            colours = np.array(PIL.Image.open(io.BytesIO(png)).convert("RGB"))
            np.testing.assert_array_equal(palette[seg[..., 0]], colours)


def test_train_aug_labels_prefer_voc_and_read_sbd_mat(built):
    _, _, splits = built
    for image_id, ex in splits["train_aug"].items():
        expected = voc_mask(image_id) if image_id in VOC_TRAIN else sbd_mask(image_id)
        np.testing.assert_array_equal(ex["segmentation"][..., 0], expected)
    assert 255 not in splits["train_aug"]["2008_000021"]["segmentation"]


def test_no_temporary_files_remain(built):
    tmp_path, builder, _ = built
    data_dir = tmp_path / "data"
    assert sorted(p.name for p in data_dir.iterdir()) == ["voc2012"]
    assert sorted(p.name for p in (data_dir / "voc2012").iterdir()) == ["1.0.0"]


def test_rebuild_reuses_the_prepared_dataset(built):
    tmp_path, builder, _ = built
    again = voc.prepare(tmp_path / "data", tmp_path / "no_such_manual_dir")
    assert again.info.splits["train_aug"].num_examples == 5


# ---------------------------------------------------------------------------
# Bad inputs: one message naming the file, nothing left, a rerun works
# ---------------------------------------------------------------------------


def assert_nothing_left(data_dir: Path):
    assert not data_dir.exists(), sorted(map(str, data_dir.rglob("*")))
    assert not voc.Voc2012(data_dir=data_dir).data_path.exists()


def assert_rerun_works(tmp_path, data_dir=None):
    builder = build(tmp_path, make_contents(), data_dir=data_dir)
    assert builder.info.splits["train_aug"].num_examples == 5
    assert len(read_split(builder, "val")) == 2


def expect_failure(tmp_path, contents, *fragments, **md5_overrides) -> str:
    with pytest.raises(VocDataError) as info:
        build(tmp_path, contents, **md5_overrides)
    message = str(info.value)
    assert "\n" not in message and ". Fix: " in message
    for fragment in fragments:
        assert fragment in message
    assert_nothing_left(tmp_path / "data")
    return message


def drop(member):
    def breaker(contents):
        archive = VOC_ARCHIVE if member.startswith("VOCdevkit") else SBD_ARCHIVE
        del contents[archive][member]
    return breaker


def replace(member, data):
    def breaker(contents):
        archive = VOC_ARCHIVE if member.startswith("VOCdevkit") else SBD_ARCHIVE
        contents[archive][member] = data
    return breaker


def rgb_png(mask):
    buf = io.BytesIO()
    PIL.Image.fromarray(voc_palette()[mask]).save(buf, format="PNG")
    return buf.getvalue()


wrong_size = np.zeros((HEIGHT - 1, WIDTH), np.uint8)
out_of_range = voc_mask("2007_000012")
out_of_range[0, 0] = 21
sbd_out_of_range = sbd_mask("2008_000022")
sbd_out_of_range[1, 1] = 40
BROKEN_MEMBERS = {
    # name: (how to break the tree, the member the message must name)
    "missing_voc_image": (drop(voc_jpeg("2007_000011")), voc_jpeg("2007_000011")),
    "missing_voc_mask": (drop(voc_png("2007_000002")), voc_png("2007_000002")),
    "missing_sbd_image": (drop(sbd_jpeg("2008_000022")), sbd_jpeg("2008_000022")),
    "missing_sbd_mat": (drop(sbd_mat("2008_000021")), sbd_mat("2008_000021")),
    "missing_split_list": (drop(f"{SBD_ROOT}/val.txt"), f"{SBD_ROOT}/val.txt"),
    "empty_split_list": (replace(f"{VOC_ROOT}/ImageSets/Segmentation/val.txt", b"\n"),
                         f"{VOC_ROOT}/ImageSets/Segmentation/val.txt"),
    "mask_size_differs": (replace(voc_png("2007_000003"), png_bytes(wrong_size)),
                          voc_png("2007_000003")),
    "sbd_label_size_differs": (replace(sbd_mat("2008_000021"), mat_bytes(wrong_size)),
                               sbd_mat("2008_000021")),
    "label_out_of_range": (replace(voc_png("2007_000012"), png_bytes(out_of_range)),
                           voc_png("2007_000012")),
    "sbd_label_out_of_range": (replace(sbd_mat("2008_000022"), mat_bytes(sbd_out_of_range)),
                               sbd_mat("2008_000022")),
    "colour_mask": (replace(voc_png("2007_000001"), rgb_png(voc_mask("2007_000001"))),
                    voc_png("2007_000001")),
    "corrupt_mat": (replace(sbd_mat("2008_000022"), b"MATLAB 5.0 MAT-file, garbage" * 9),
                    sbd_mat("2008_000022")),
    "mat_without_gtcls": (replace(sbd_mat("2008_000021"),
                                  mat_bytes(np.zeros((2, 2), np.uint8)).replace(b"GTcls", b"Other")),
                          sbd_mat("2008_000021")),
    "corrupt_jpeg": (replace(voc_jpeg("2007_000002"), b"\xff\xd8\xff\xe0 not a jpeg"),
                     voc_jpeg("2007_000002")),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MEMBERS))
def test_broken_member(tmp_path, case):
    breaker, member = BROKEN_MEMBERS[case]
    contents = make_contents()
    breaker(contents)
    expect_failure(tmp_path, contents, member)
    assert_rerun_works(tmp_path)


def test_missing_archive(tmp_path):
    pack(make_contents(), tmp_path / "manual")
    (tmp_path / "manual" / SBD_ARCHIVE).unlink()
    with pytest.raises(VocDataError) as info:
        voc.prepare(tmp_path / "data", tmp_path / "manual", expected_md5={
            VOC_ARCHIVE: None, SBD_ARCHIVE: None})
    message = str(info.value)
    assert SBD_ARCHIVE in message and VOC_ARCHIVE not in message.split(". Fix:")[0]
    assert str(tmp_path / "manual") in message
    assert "python -m scaleattn.data.build" in message and "--download" in message
    assert_nothing_left(tmp_path / "data")
    assert_rerun_works(tmp_path)


def test_wrong_md5(tmp_path):
    message = expect_failure(tmp_path, make_contents(), str(tmp_path / "manual" / VOC_ARCHIVE),
                             "0" * 32, **{VOC_ARCHIVE: "0" * 32})
    assert "md5" in message
    assert_rerun_works(tmp_path)


def test_default_md5s_are_the_real_archives():
    builder_md5 = voc.Voc2012(data_dir="/nonexistent")._expected_md5
    assert builder_md5 == {VOC_ARCHIVE: "6cd6e144f989b92b3379bac3b3de84fd",
                           SBD_ARCHIVE: "82b4d87ceb2ed10f6038a1cba92111cb"}
    with pytest.raises(ValueError, match="expected_md5"):
        voc.Voc2012(data_dir="/nonexistent", expected_md5={VOC_ARCHIVE: None})


def tar_end_of_last_member(path: Path) -> int:
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("archive,cut", [
    (VOC_ARCHIVE, "half"),          # inside a member's data
    (VOC_ARCHIVE, "member_end"),    # at a member boundary: only the end marker is lost
    (SBD_ARCHIVE, "half"),          # a truncated gzip stream
    (SBD_ARCHIVE, "last_bytes"),    # only the gzip trailer (CRC, length) is lost
    (VOC_ARCHIVE, "garbled_header"),  # tarfile would stop there quietly
])
def test_truncated_archive(tmp_path, archive, cut):
    contents = make_contents()
    pack(contents, tmp_path / "manual")
    path = tmp_path / "manual" / archive
    data = path.read_bytes()
    if cut == "garbled_header":
        with tarfile.open(path) as tar:
            offset = tar.getmember(voc_png(VOC_VAL[0])).offset
        data = data[:offset] + b"\x07" * 512 + data[offset + 512:]
    size = {"half": len(data) // 2, "last_bytes": len(data) - 4, "garbled_header": len(data),
            "member_end": tar_end_of_last_member(path) if cut == "member_end" else 0}[cut]
    with pytest.raises(VocDataError) as info:
        # md5 checks skipped: the archive-structure checks alone must catch it.
        path.write_bytes(data[:size])
        voc.prepare(tmp_path / "data", tmp_path / "manual",
                    expected_md5={VOC_ARCHIVE: None, SBD_ARCHIVE: None})
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message
    assert_nothing_left(tmp_path / "data")
    assert_rerun_works(tmp_path)


def test_unwritable_data_dir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: show what a user would see
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            Path(path) != locked and real_access(path, mode, **kw)))
    try:
        with pytest.raises(VocDataError) as info:
            build(tmp_path, make_contents(), data_dir=locked / "data")
        assert str(locked / "data") in str(info.value) and "writable" in str(info.value)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
    monkeypatch.undo()
    assert_rerun_works(tmp_path, data_dir=locked / "data")


def test_data_dir_below_a_file(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(VocDataError, match="a_file.* is not a writable folder"):
        build(tmp_path, make_contents(), data_dir=tmp_path / "a_file" / "data")


# ---------------------------------------------------------------------------
# Downloading (plumbing only: no internet here) and the command line
# ---------------------------------------------------------------------------


def test_download_fetches_what_the_manual_dir_lacks(tmp_path, monkeypatch):
    md5 = pack(make_contents(), tmp_path / "elsewhere")
    manual = tmp_path / "manual"
    manual.mkdir()
    (tmp_path / "elsewhere" / VOC_ARCHIVE).rename(manual / VOC_ARCHIVE)
    fetched = []

    def fake_download(self, url):
        fetched.append(url)
        return tmp_path / "elsewhere" / url.rsplit("/", 1)[1]

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    builder = voc.prepare(tmp_path / "data", manual, download=True, expected_md5=md5)
    assert fetched == [voc.ARCHIVE_URLS[SBD_ARCHIVE]]
    assert builder.info.splits["train_aug"].num_examples == 5


def test_build_command_prints_counts(tmp_path, capsys):
    from scaleattn.data import build as build_cli
    pack(make_contents(), tmp_path / "manual")
    # The real md5s do not match the tiny archives: the command reports that.
    assert build_cli.main([f"--data_dir={tmp_path / 'data'}",
                           f"--manual_dir={tmp_path / 'manual'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: archive ") and "md5" in err[0]
    assert "Traceback" not in err[0]
    assert_nothing_left(tmp_path / "data")

    build(tmp_path, make_contents())  # prepared with the tiny archives' md5s
    assert build_cli.main([f"--data_dir={tmp_path / 'data'}"]) == 0  # reused
    out = capsys.readouterr().out
    for split, count in (("train", 3), ("val", 2), ("train_aug", 5)):
        assert f"  {split:10s} {count:6d} examples" in out
