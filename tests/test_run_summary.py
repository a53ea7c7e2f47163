"""The last lines of a training run: scores by class name, where things are, what next."""
import os

import numpy as np

from scaleattn import run_summary


def test_lines_name_scores_places_and_next_commands(tmp_path):
    workdir = str(tmp_path / "run")
    pictures = [os.path.join(workdir, "eval_pictures", name)
                for name in ("eval_0.png", "eval_0_input.png", "eval_1.png", "eval_1_input.png")]
    text = "\n".join(run_summary.lines(
        config_file="configs/demo.py", workdir=workdir, steps=1200,
        scores={"miou": 0.8456, "per_class_iou": np.array([0.981, 0.85, 0.8249, np.nan])},
        class_names=("background", "circle", "square", "triangle"), pictures=pictures))
    assert "val mIoU 84.6%" in text
    assert "background 98.1  circle 85.0  square 82.5  triangle n/a" in text
    assert os.path.join(workdir, "checkpoints", "1200") in text
    assert f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}" in text
    assert f"2 val images in {os.path.join(workdir, 'eval_pictures')}/" in text
    assert (f"python -m scaleattn.main --config=configs/demo.py --workdir={workdir} "
            f"--mode=predict --input={pictures[1]}") in text
    assert f"python -m scaleattn.report {workdir}" in text


def test_lines_without_evaluation_or_pictures(tmp_path):
    text = "\n".join(run_summary.lines(
        config_file="my configs/x.py", workdir=str(tmp_path), steps=5, scores={},
        class_names=("background",), pictures=[]))
    assert "no evaluation" in text and "mIoU" not in text and "predictions:" not in text
    assert "--config='my configs/x.py'" in text  # quoted for the shell
    assert "--input=IMAGE.png" in text


def test_iou_line_names_classes_past_the_list_by_index():
    assert run_summary.iou_line([0.5, 0.25], ("background",)) == "background 50.0  class 1 25.0"
