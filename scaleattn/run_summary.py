"""The lines a finished training run prints last: its scores, where it wrote what, and
the commands to run next.

`lines` is a pure function of what the run left (its scores, its workdir's layout, the
config file it was started with), so that ``python -m scaleattn.main --config=... ``
ends with something a newcomer can act on without reading the log above it.
"""

import os
import shlex

from scaleattn import checkpoint


def iou_line(per_class_iou, names) -> str:
    """``'background 98.1  circle 85.0 ...'``: per-class IoU in %, by name (``class <i>``
    past the end of ``names``; ``n/a`` for a class absent from the split)."""
    parts = []
    for i, value in enumerate(per_class_iou):
        name = names[i] if i < len(names) else f"class {i}"
        parts.append(f"{name} {'n/a' if value != value else f'{100 * value:.1f}'}")
    return "  ".join(parts)


def lines(*, config_file: str, workdir: str, scores: dict, steps: int,
          class_names, pictures: list[str]) -> list[str]:
    """The summary of a finished run, one string per line.

    Args:
      config_file: the ``--config`` argument the run was started with (repeated in the
        next commands as given).
      workdir: the run's ``--workdir``.
      scores: the final evaluation (``miou``, ``per_class_iou``; `metrics.scores`), or
        ``{}`` when the run did not evaluate.
      steps: the step of the final checkpoint.
      class_names: names of the classes by label index.
      pictures: the eval pictures the run wrote (`summaries.EvalPictures.save`).
    """
    workdir = checkpoint.resolve_workdir(workdir)
    quoted = shlex.quote(workdir)
    main = f"python -m scaleattn.main --config={shlex.quote(config_file)} --workdir={quoted}"
    out = []
    if scores:
        out.append(f"Finished {steps} steps: val mIoU {100 * scores['miou']:.1f}%")
        out.append(f"  IoU per class (%): {iou_line(scores['per_class_iou'], class_names)}")
    else:
        out.append(f"Finished {steps} steps (no evaluation: train.eval_at_end is off)")
    out.append(f"  checkpoint:  {os.path.join(checkpoint.checkpoint_dir(workdir), str(steps))}")
    logs = shlex.quote(os.path.join(workdir, "tensorboard"))
    out.append(f"  TensorBoard: tensorboard --logdir {logs}")
    out.append(f"  run record:  {os.path.join(workdir, 'run.json')}")
    panels = [p for p in pictures if not p.endswith("_input.png")]
    inputs = [p for p in pictures if p.endswith("_input.png")]
    if panels:
        out.append(f"  predictions: {len(panels)} val images in {os.path.dirname(panels[0])}/ "
                   f"(eval_<i>.png: image | truth | prediction | attention per scale)")
    out.append("Next:")
    image = shlex.quote(inputs[0]) if inputs else "IMAGE.png"
    out.append(f"  {main} --mode=predict --input={image}   # masks, overlays, attention maps")
    out.append(f"  {main} --mode=analyze   # attention against object size")
    out.append(f"  python -m scaleattn.report {quoted}   # the run as a table row")
    return out
