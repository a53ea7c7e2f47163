"""Picture of the dense CRF on eval images: image | ground truth | mask | mask after the CRF.

    python -m benchmarks.crf_figure --config=configs/demo.py --workdir=RUN \\
        --output=docs/crf_demo.png [--images=0,1,2] [--config.crf.bilateral_weight=...]

Reads the chosen examples of ``data.eval_split`` (their index in the split), predicts
them with the latest checkpoint of ``--workdir`` (read-only) as ``--mode=predict``
does, once without and once with the dense CRF of the config's ``crf.*`` values
(`scaleattn.predict.predict_image`), and writes one row of four pictures per image
(VOC colours; white = the ignore band) as a PNG.
"""

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from scaleattn import crf, inference, predict, viz

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.")
flags.DEFINE_string("workdir", None, "A trained run.")
flags.DEFINE_string("output", None, "The PNG to write.")
flags.DEFINE_list("images", ["0", "1", "2"], "Indices of eval-split examples.")
flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv):
    del argv
    from scaleattn.data import pipeline  # pylint: disable=import-outside-toplevel
    config = FLAGS.config
    jax.config.update("jax_default_prng_impl", config.prng_impl)  # as scaleattn.main does
    wanted = sorted({int(i) for i in FLAGS.images})
    model, state, step = inference.restore_trained(config, FLAGS.workdir)
    predictor = inference.Predictor(model)
    params = crf.CRFParams.from_config(config.crf)
    rows = []
    for index, batch in enumerate(pipeline.eval_batches(config.data, batch_size=1,
                                                        ignore_label=config.loss.ignore_label)):
        if index > wanted[-1]:
            break
        if index not in wanted:
            continue
        image = viz.denormalize(batch["image"][0], config.data.mean, config.data.std)
        label = batch["label"][0]
        outputs = predict.predict_image(predictor, state, image, config.data, params)
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([image, gap, viz.colorize(label), gap,
                                    viz.colorize(outputs["prediction"]), gap,
                                    viz.colorize(outputs["prediction_crf"])], axis=1))
    spacer = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    picture = np.concatenate(sum(([row, spacer] for row in rows), [])[:-1], axis=0)
    Image.fromarray(picture).save(FLAGS.output, optimize=True)
    print(f"{FLAGS.output}: examples {wanted} of {config.data.eval_split}, step {step}, "
          f"CRF {params.as_dict()}")


if __name__ == "__main__":
    app.run(main)
