"""What a training run shows a person: scalars and pictures in TensorBoard, progress
in the log.

Written with tensorboardX's event writer (no TensorFlow needed: the GPU machines
have none; clu's metric writers import TensorFlow). Process 0 only.
"""

import os
import time

import jax
import numpy as np
from absl import logging

from scaleattn import inference, outputs, viz


class MetricWriter:
    """Scalars and images to ``workdir/tensorboard``, on process 0 (a no-op elsewhere)."""

    def __init__(self, workdir: str):
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), step)
            self.writer.flush()

    def image(self, step: int, tag: str, picture: np.ndarray) -> None:
        """``picture``: ``uint8 [h, w, 3]``."""
        if self.writer is not None:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """Throughput and time left, measured over the steps since the last report."""

    def __init__(self, total_steps: int, images_per_step: int):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.window_start, self.window_steps = time.time(), 0

    def step(self) -> None:
        self.window_steps += 1

    def report(self, done: int) -> tuple[float, str]:
        """``(images per second, 'ETA 0h01m02s')`` over the window; starts a new one."""
        elapsed = max(time.time() - self.window_start, 1e-9)
        steps = max(self.window_steps, 1)
        left = int(max(0, (self.total_steps - done) * elapsed / steps))
        self.window_start, self.window_steps = time.time(), 0
        return (steps * self.images_per_step / elapsed,
                f"{left // 3600}h{left % 3600 // 60:02d}m{left % 60:02d}s")


def log_progress(writer: MetricWriter, progress: Progress, done: int, scalars: dict) -> None:
    """One log line of a training step's scalars (plus img/s and ETA) and the same
    scalars in TensorBoard."""
    scalars["images_per_second"], eta = progress.report(done)
    logging.info("step %d/%d  loss %.4f  lr %.2e  %.1f img/s  ETA %s", done,
                 progress.total_steps, scalars["loss"], scalars["learning_rate"],
                 scalars["images_per_second"], eta)
    writer.scalars(done, scalars)


PICTURES_DIR = "eval_pictures"  # in the workdir: the final eval's pictures as PNG files


class EvalPictures:
    """TensorBoard pictures (`viz.panel`) of the first eval images, one set per eval.

    The images are read and the forward pass compiled once, at the first eval; each
    later eval only runs the model. Shows ``config.predict.summary_images`` images
    (0 = none) of the eval split, tag ``eval_images/<i>``; nothing happens where the
    writer is disabled (processes other than 0).
    """

    def __init__(self, writer: MetricWriter, config, model):
        self.writer, self.config = writer, config
        self.predictor = inference.Predictor(model)
        self.batch = None

    def pictures(self, host_state) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``[(index, image uint8 [H, W, 3], panel uint8 [H, k W, 3])]`` of the first
        ``config.predict.summary_images`` eval images under ``host_state`` (`viz.panel`:
        image | truth | prediction | attention per scale); ``[]`` if that is 0."""
        config = self.config
        count = config.predict.summary_images
        if count <= 0:
            return []
        if self.batch is None:
            from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
            self.batch = next(pipeline.eval_batches(
                config.data, batch_size=count, ignore_label=config.loss.ignore_label,
                process_index=0, process_count=1))
        batch = self.batch
        outputs = self.predictor(jax.device_get(host_state), batch["image"])
        result = []
        for i, (image, label) in enumerate(zip(batch["image"], batch["label"])):
            if np.all(label == config.loss.ignore_label):  # a filler slot of the last batch
                continue
            rgb = viz.denormalize(image, config.data.mean, config.data.std)
            result.append((i, rgb, viz.panel(
                rgb, outputs["prediction"][i], label=label,
                attention=outputs["attention"][i] if "attention" in outputs else None,
                alpha=config.predict.overlay_alpha)))
        return result

    def write(self, step: int, host_state) -> None:
        """Pictures at ``step`` of ``host_state`` (a `TrainState` this process can read,
        `parallel.Layout.host`)."""
        if not self.writer.enabled:
            return
        for i, _, picture in self.pictures(host_state):
            self.writer.image(step, f"eval_images/{i}", picture)
        self.writer.writer.flush()

    def save(self, host_state, folder: str) -> list[str]:
        """The same pictures as PNG files in ``folder`` (created): ``eval_<i>.png`` (the
        panel) and ``eval_<i>_input.png`` (the image alone, an input for
        ``--mode=predict``), each through a temporary file and a rename; their paths.
        Nothing on processes other than 0."""
        if not self.writer.enabled:
            return []
        from PIL import Image  # pylint: disable=import-outside-toplevel
        pictures = self.pictures(host_state)
        if pictures:
            outputs.make_dir(folder, "eval pictures")
        paths = []
        for i, rgb, picture in pictures:
            for suffix, array in (("", picture), ("_input", rgb)):
                path = os.path.join(folder, f"eval_{i}{suffix}.png")
                outputs.atomic_write(path, lambda f, a=array: Image.fromarray(a).save(
                    f, format="PNG"))
                paths.append(path)
        return paths
