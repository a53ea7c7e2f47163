"""``--mode=predict``: masks and attention maps of image files.

* `predict_files` (``--mode=predict``): image files or folders in (read with PIL, no
  TensorFlow) -> per image a palette PNG mask (and, with ``eval.crf``, the mask after
  the dense CRF, `scaleattn.crf`), an overlay, one attention heat map per scale and
  the RGB composite of the merged weights (`scaleattn.viz`).

The images are read, checked and normalised here; the network runs in
`scaleattn.inference`.
"""

import os
import re
import warnings

import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageOps, UnidentifiedImageError

from scaleattn import config as config_lib
from scaleattn import crf, inference, outputs, viz
from scaleattn.data import errors, eval_input

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class InputError(errors.DataError):
    """An input image that cannot be read, or no images at all."""


# ----------------------------------------------------------------------- files ---


def list_images(inputs) -> list[str]:
    """Image files named in ``inputs`` (files, or folders searched one level deep)."""
    paths = []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, name) for name in os.listdir(item)
                            if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise InputError(f"--input {item}: no such file or folder")
    if not paths:
        raise InputError(f"--input {','.join(inputs)}: no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths


# Images larger than this are refused (a decompression bomb, or more than one forward
# pass at full resolution can hold); PIL's own guard (`Image.MAX_IMAGE_PIXELS`, about 179
# million for an error) is caught and reported the same way.
MAX_PIXELS = 25_000_000
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
RGB_CONVERTIBLE_MODES = ("1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK",
                         "YCbCr", "HSV")


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """``uint8 [h, w] -> [h, w, 3]``."""
    return np.repeat(grey[..., None], 3, axis=-1)


def to_rgb8(image: Image.Image, path: str) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB of a PIL image of any mode, or `InputError` naming the mode.

    * 16-bit grey (``I;16*``) and 32-bit integer grey (``I``, values 0..65535) are
      scaled by 255/65535 (rounded), not clipped at 255; ``I`` outside 0..65535 is refused;
    * float grey (``F``) must hold 0..1, scaled by 255 (rounded); anything else (or NaN)
      is refused;
    * ``LAB`` goes through a colour transform (ImageCms, LAB D50 -> sRGB);
    * palette, bilevel, grey, CMYK, YCbCr, HSV and alpha modes: PIL's conversion
      (alpha is dropped: the colour as stored);
    * any other mode is refused.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"image {path} has 32-bit integer pixels from {values.min()} to "
                             f"{values.max()}; --mode=predict reads integer grey levels in "
                             f"0..65535: convert it to 8-bit RGB first")
        return grey_to_rgb(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0
                                and values.max() <= 1):
            raise InputError(f"image {path} has float pixels outside 0..1 (from "
                             f"{np.nanmin(values):g} to {np.nanmax(values):g}); --mode=predict "
                             f"reads float grey levels in 0..1: convert it to 8-bit RGB first")
        return grey_to_rgb(np.round(values * 255).astype(np.uint8))
    if mode == "LAB":
        from PIL import ImageCms  # pylint: disable=import-outside-toplevel
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                            ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return np.asarray(ImageCms.applyTransform(image, transform))
    if mode in RGB_CONVERTIBLE_MODES:
        return np.asarray(image.convert("RGB"))
    raise InputError(f"image {path} has PIL mode {mode!r}, which --mode=predict cannot "
                     f"convert to RGB: save it as 8-bit RGB (or grey) first")


def load_image(path: str) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB pixels of an image file (EXIF orientation applied).

    `InputError` naming the file for one that cannot be read, has more than
    `MAX_PIXELS` pixels, or a mode that cannot be converted (`to_rgb8`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InputError(
                        f"image {path} is {width}x{height} pixels ({width * height / 1e6:.1f} "
                        f"million), more than the {MAX_PIXELS / 1e6:g} million --mode=predict "
                        f"reads: resize it first")
                return to_rgb8(ImageOps.exif_transpose(image), path)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(pixels.group(1)) / 1e6:.1f} million pixels)" if pixels else ""
        raise InputError(f"image {path} is too large{size}: --mode=predict reads at most "
                         f"{MAX_PIXELS / 1e6:g} million pixels, resize it first") from e
    except UnidentifiedImageError as e:
        raise InputError(f"cannot read image {path}: not an image file PIL can identify") from e
    except Exception as e:  # pylint: disable=broad-except  # decoders raise many types
        raise InputError(f"cannot read image {path}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from e


def normalize_and_pad(image: np.ndarray, data_config) -> np.ndarray:
    """``uint8 [h, w, 3]`` -> ``float32 [1, H, W, 3]``: the eval input
    (`data.eval_input.eval_image`) at `data.eval_input.padded_size`."""
    size = eval_input.padded_size(*image.shape[:2], data_config.eval_size)
    return eval_input.eval_image(image, size, data_config.mean, data_config.std)[None]


def predict_image(predictor: inference.Predictor, state, image: np.ndarray, data_config,
                  crf_params: crf.CRFParams | None = None) -> dict:
    """`inference.forward`'s outputs for one ``uint8 [h, w, 3]`` image, cropped to ``[h, w, ...]``.

    With ``crf_params`` also ``prediction_crf``: the labels after the dense CRF on the
    probabilities (run on the padded array with the padding masked out, so that images
    of one padded size share one compilation).
    """
    h, w = image.shape[:2]
    padded = normalize_and_pad(image, data_config)
    outputs = predictor(state, padded)
    inference.check_finite_probs(outputs["probs"], "this image")
    if crf_params is not None:
        rgb = np.zeros(padded.shape, np.float32)
        rgb[0, :h, :w] = image
        valid = np.zeros(padded.shape[:3], bool)
        valid[0, :h, :w] = True
        marginals = crf.dense_crf_fitted(crf.log_probs_of(outputs["probs"]), rgb, valid,
                                         crf_params)
        outputs["prediction_crf"] = np.asarray(jnp.argmax(marginals, -1), np.int32)
    return {key: value[0, :h, :w] for key, value in outputs.items()}


def output_pictures(image: np.ndarray, outputs: dict, scales, alpha: float) -> dict:
    """File suffix -> picture: ``mask`` (palette `PIL.Image`), ``mask_crf`` (when
    ``outputs`` has ``prediction_crf``), ``overlay``, one ``attention_<i>_x<scale>``
    heat map per scale and ``attention_rgb`` (<= 3 scales)."""
    pictures = {"mask": viz.mask_image(outputs["prediction"]),
                "overlay": viz.overlay(image, outputs["prediction"], alpha)}
    if "prediction_crf" in outputs:
        pictures["mask_crf"] = viz.mask_image(outputs["prediction_crf"])
    attention = outputs.get("attention")
    if attention is not None:
        for i, scale in enumerate(scales):
            pictures[f"attention_{i}_x{scale:g}"] = viz.heatmap(attention[..., i])
        if attention.shape[-1] <= 3:
            pictures["attention_rgb"] = viz.attention_rgb(attention)
    return pictures


def save_pictures(pictures: dict, output_dir: str, stem: str) -> list[str]:
    """Writes ``<output_dir>/<stem>_<suffix>.png`` for each picture (each through a
    temporary file and a rename); the paths."""
    paths = []
    for suffix, picture in pictures.items():
        path = os.path.join(output_dir, f"{stem}_{suffix}.png")
        image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
        outputs.atomic_write(path, lambda f, image=image: image.save(f, format="PNG"))
        paths.append(path)
    return paths


def check_images(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Decodes every image once (keeping nothing): ``(readable paths, [(path, why), ...])``."""
    good, bad = [], []
    for path in paths:
        try:
            load_image(path)
            good.append(path)
        except InputError as e:
            bad.append((path, str(e)))
    return good, bad


def predict_files(config, workdir: str, inputs, output_dir: str, *,
                  skip_bad_inputs: bool = False, fallback: bool = False) -> list[str]:
    """``--mode=predict``: pictures of every input image in ``output_dir``; their paths.

    Every input is read first: an unreadable one stops the batch before anything is
    written (`InputError` naming it), unless ``skip_bad_inputs``, which predicts the
    others and lists the skipped files at the end. ``output_dir`` is checked before
    the work and created only when there is something to write.
    """
    paths = list_images(inputs)
    output_dir = outputs.check_dir(output_dir, "--output")
    paths, bad = check_images(paths)
    if bad and not skip_bad_inputs:
        more = f" (and {len(bad) - 1} more unreadable input(s))" if len(bad) > 1 else ""
        raise InputError(f"{bad[0][1]}{more}; nothing was written. Fix or remove it, or pass "
                         f"--skip_bad_inputs to predict the readable ones.")
    if not paths:
        raise InputError(f"none of the {len(bad)} input image(s) can be read; the first: "
                         f"{bad[0][1]}")
    model, state, step = inference.restore_trained(config, workdir, fallback=fallback)
    predictor = inference.Predictor(model)
    crf_params = crf.CRFParams.from_config(config.crf) if config.eval.crf else None
    outputs.make_dir(output_dir, "--output")
    written, stems = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        while stem in stems:  # same file name in two folders
            stem += "_"
        stems.add(stem)
        image = load_image(path)
        outputs_of = predict_image(predictor, state, image, config.data, crf_params)
        written += save_pictures(
            output_pictures(image, outputs_of, config_lib.inference_scales(config.model),
                            config.predict.overlay_alpha), output_dir, stem)
    logging.info("Predicted %d image(s) with the step-%d checkpoint of %s into %s.",
                 len(paths), step, workdir, output_dir)
    if bad:
        logging.warning("Skipped %d unreadable input(s) (--skip_bad_inputs):\n%s", len(bad),
                        "\n".join(f"  {why}" for _, why in bad))
    return written
