"""Attention against object size on hand-made label maps with known objects."""
import csv

import numpy as np
import pytest
from PIL import Image

from scaleattn import analysis


def hand_made():
    """A 12x16 label map: four objects of known area, an ignore band, background.

    class 1: a 3x3 square (area 9) and, touching it only at a corner (so a separate
    4-connected object), a 1x4 bar (area 4); class 2: a 4x5 block (area 20) with an
    ignore band (255) around part of it; class 3: one pixel (area 1).
    """
    label = np.zeros((12, 16), np.int32)
    label[1:4, 1:4] = 1
    label[4, 4:8] = 1
    label[6:10, 8:13] = 2
    label[5, 7:14] = 255
    label[11, 0] = 3
    return label


def test_objects_are_the_connected_components_of_each_class():
    objects = analysis.object_components(hand_made())
    assert [(cls, int(mask.sum())) for cls, mask in objects] == [(1, 9), (1, 4), (2, 20), (3, 1)]


def test_rows_give_area_and_mean_weight_per_scale():
    label = hand_made()
    attention = np.zeros(label.shape + (2,), np.float32)
    attention[..., 0] = 0.5
    attention[1:4, 1:4, 0] = 0.9          # the small square leans on scale 0
    attention[1, 1, 0] = 0.0              # ... except one of its 9 pixels
    attention[6:10, 8:13, 0] = 0.2
    attention[..., 1] = 1 - attention[..., 0]
    rows = analysis.object_rows(label, attention, image=7)
    assert [(r["image"], r["object"], r["class"], r["area"]) for r in rows] == [
        (7, 0, 1, 9), (7, 1, 1, 4), (7, 2, 2, 20), (7, 3, 3, 1)]
    assert rows[0]["weight_0"] == pytest.approx(0.8)     # (8 * 0.9 + 0) / 9
    assert rows[0]["weight_1"] == pytest.approx(0.2)
    assert rows[1]["weight_0"] == pytest.approx(0.5)
    assert rows[2]["weight_0"] == pytest.approx(0.2) and rows[2]["weight_1"] == pytest.approx(0.8)


def test_low_resolution_attention_is_upsampled_to_the_label():
    label = hand_made()
    attention = np.zeros((3, 4, 2), np.float32)
    attention[..., 0], attention[..., 1] = 0.25, 0.75  # constant: same after resizing
    up = analysis.resize_attention(attention, label.shape)
    assert up.shape == (12, 16, 2)
    np.testing.assert_allclose(up, np.broadcast_to([0.25, 0.75], up.shape), atol=1e-6)
    corner = np.arange(12, dtype=np.float32).reshape(3, 4, 1)   # corners map onto corners
    grown = analysis.resize_attention(corner, (5, 7))
    assert grown[0, 0, 0] == 0 and grown[-1, -1, 0] == pytest.approx(11)
    rows = analysis.object_rows(label, attention)
    assert all(r["weight_0"] == pytest.approx(0.25) for r in rows)


def test_summary_bins_and_correlation():
    rows = [{"area": a, "weight_0": w, "weight_1": 1 - w}
            for a, w in [(10, 0.9), (12, 0.8), (100, 0.6), (1000, 0.3), (5000, 0.1)]]
    summary = analysis.summarize(rows, (1.0, 0.5))
    assert summary["objects"] == 5
    assert summary["spearman_weight_vs_area"] == pytest.approx([-1.0, 1.0])
    first = summary["bins"][0]
    assert first["count"] == 2 and first["mean_weight"] == pytest.approx([0.85, 0.15])
    assert sum(b["count"] for b in summary["bins"]) == 5


def test_csv_and_plot(tmp_path):
    rows = analysis.object_rows(hand_made(), np.full((12, 16, 2), 0.5, np.float32))
    analysis.write_csv(rows, tmp_path / "objects.csv")
    with open(tmp_path / "objects.csv", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert [int(r["area"]) for r in read] == [9, 4, 20, 1]
    assert list(read[0]) == ["image", "object", "class", "area", "weight_0", "weight_1"]
    analysis.plot_weight_vs_size(rows, (1.0, 0.5), str(tmp_path / "plot.png"), title="t")
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.size == (760, 480)
        pixels = np.array(plot.convert("RGB"))
    red = np.all(pixels == analysis.SCALE_COLOURS[0], axis=-1)
    assert red.sum() > 20  # the scale-0 mean line and legend are drawn
