"""`scale_shapes`: a generated segmentation set on which scale matters.

The demo dataset (docs/design.md, "The demo dataset"), written as a real TFDS dataset with the same
features as the VOC builder (`image`, `segmentation`, `image_id`), so that the
input pipeline and the training loop cannot tell the two apart.

Design choices:

* **Classes differ only by shape.** Three classes (1 circle, 2 square,
  3 triangle; 0 is background) with a random colour per object and the same
  size distribution for every class. Shapes of one nominal size `r` have the
  area of a disk of radius `r`, so neither colour, texture, area nor extent
  says which class an object is: only its outline does. A probe
  (tiny nets, 96x96 images) showed that texture-separable classes make input scale irrelevant; outlines
  are read best when the object fills the receptive field, so small objects
  want the large input and large objects the small one.
* **Sizes span 16x.** `r` is log-uniform in [R_MIN, R_MAX] = [2.5, 40] px, so
  small and large objects are equally common on a log scale. R_MAX is the
  largest radius whose widest shape (the triangle, circumradius 1.56 r) still
  fits a 128-px image whole.
* **Whole and apart.** Every object lies wholly inside the image, and the disks
  circumscribing any two objects are at least GAP px apart (`PLACEMENT_TRIES`
  centres are tried; an object that finds no room is left out). An object cut by
  the frame or half hidden by another shows only part of the outline that tells
  its class: on such data (2.0.0) the demo net confused squares with the other
  classes, a confusion that no choice of input scale removes.
* **Upright shapes.** Squares stand on a side and triangles on their base
  (`UPRIGHT_ANGLE`): rotation is a nuisance unrelated to scale, and one that a
  small net trained for minutes learns slowly. Each object's shading runs in a
  random direction of its own, so shading tells no class.
* **Varied backgrounds.** A linear gradient between two random colours plus
  smooth low-frequency colour noise, and per-pixel noise over everything, so
  background is not one colour; each object's colour is resampled until it
  stands out from the background at its centre.
* **Count.** 1-4 objects per image are drawn (fewer are placed when the
  image has no room), largest first.
* **Ignore band.** Like VOC, each object's outline is labelled 255 (ignore):
  the pixels within one pixel of the boundary on either side (~2 px wide).
* **Deterministic.** Example `i` of split `s` is drawn with
  `np.random.Generator` seeded by `(crc32(s), i)` only, so a rebuild gives
  byte-identical data and the tiny test configs are prefixes of the default
  one.
* **Atomic.** TFDS writes into a temporary ``incomplete.*`` folder and renames
  it on success; on an exception that folder is deleted, so nothing half-built
  is ever found by a rerun (tested).

Sizes: the default config (`default`) has 2000 train / 300 val images of
128x128. `shapes_config(train_size, val_size)` gives a config of other sizes
under its own name (``train16_val8`` ...), in its own folder of the same
data_dir.
"""

import dataclasses
import sys
import zlib

import numpy as np
import tensorflow_datasets as tfds

from scaleattn.config import VOC_IGNORE_LABEL

# TFDS 4.9 imports `importlib_resources` when it prepares a dataset but declares
# it only for Python < 3.9 (tensorflow/datasets#11212). The standard library's
# `importlib.resources` has everything it uses; stand it in if the backport is
# missing.
try:
    import importlib_resources  # pylint: disable=unused-import
except ImportError:
    import importlib.resources
    import importlib.resources.abc
    sys.modules["importlib_resources"] = importlib.resources

NUM_CLASSES = 4          # background + 3 shapes
CLASS_NAMES = ("background", "circle", "square", "triangle")
IMAGE_SIZE = 128         # default image side
TRAIN_SIZE = 2000        # default number of images per split
VAL_SIZE = 300
R_MIN, R_MAX = 2.5, 40.0  # nominal object radius range (px), log-uniform
MAX_OBJECTS = 4
PLACEMENT_TRIES = 20     # centres tried per object before it is left out
GAP = 5.0                # px between the circumscribed disks of two objects: their
                         # ignore bands (1 px out) never touch, background between
MIN_CONTRAST = 60.0      # RGB distance of an object's colour to the background
# Rotation of each class's outline: squares axis-aligned, triangles with a vertex up
# (`shape_mask`'s half-plane normals then point down, up-left and up-right).
UPRIGHT_ANGLE = {1: 0.0, 2: 0.0, 3: np.pi / 2}


# ---------------------------------------------------------------- drawing -----


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One object: class id (1..3), centre (y, x), nominal radius, rotation."""

    label: int
    cy: float
    cx: float
    radius: float
    angle: float            # rotation of the outline (`UPRIGHT_ANGLE`)
    color: np.ndarray       # [3] float, 0..255
    shading: np.ndarray     # [3] float, colour change across the object ...
    shade_angle: float      # ... along this direction (radians)


def half_extent(label: int, radius: float) -> float:
    """Largest distance of any point of the shape from its centre (px).

    Circles have radius `r`; squares and triangles have the area of that disk.
    """
    if label == 1:
        return radius
    if label == 2:
        return radius * np.sqrt(np.pi) / 2 * np.sqrt(2)   # half side * sqrt 2
    return radius * np.sqrt(4 * np.pi / (3 * np.sqrt(3)))  # circumradius


def shape_mask(label: int, radius: float, angle: float,
               dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Which pixel centres lie inside a shape centred at offset 0.

    Args:
      label: 1 circle, 2 square, 3 triangle.
      radius: nominal radius; all shapes have the area of a disk of it.
      angle: rotation in radians (ignored for circles).
      dy, dx: [h, w] offsets of pixel centres from the shape's centre.
    Returns:
      [h, w] bool.
    """
    if label == 1:
        return dy * dy + dx * dx <= radius * radius
    cos, sin = np.cos(angle), np.sin(angle)
    if label == 2:
        half_side = radius * np.sqrt(np.pi) / 2
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        return np.maximum(np.abs(u), np.abs(v)) <= half_side
    if label == 3:
        inradius = half_extent(3, radius) / 2
        inside = np.ones(dy.shape, bool)
        for k in range(3):
            phi = angle + 2 * np.pi * k / 3
            inside &= np.cos(phi) * dx + np.sin(phi) * dy <= inradius
        return inside
    raise ValueError(f"unknown shape label {label}")


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of a [h, w] bool mask (outside counts as False)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for oy in range(3):
        for ox in range(3):
            out |= padded[oy:oy + h, ox:ox + w]
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion of a [h, w] bool mask (outside counts as True)."""
    return ~dilate(~mask)


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] matrix that linearly interpolates n_in samples to n_out."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random smooth colour field: [size, size, 3] float32, about 0..255.

    A linear gradient between two random colours in a random direction plus
    smooth colour noise, both given on a 5x5 grid of control points and
    interpolated bilinearly (exact for the gradient, which is linear).
    """
    c0, c1 = rng.uniform(0, 255, (2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    coords = np.linspace(0, 1, 5)
    t = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    grid = c0 + (c1 - c0) * t[..., None]                             # [5, 5, 3]
    grid += rng.normal(0, rng.uniform(10, 35), (5, 5, 3))
    interp = _bilinear_matrix(size, 5).astype(np.float32)            # [S, 5]
    rows = np.tensordot(interp, grid.astype(np.float32), axes=(1, 0))  # [S, 5, 3]
    return np.ascontiguousarray(
        np.tensordot(rows, interp, axes=(1, 1)).transpose(0, 2, 1))


def place(rng: np.random.Generator, size: int, extent: float,
          placed: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """A centre ``(cy, cx)`` for an object of half-extent ``extent`` that keeps it
    wholly inside a ``size``-px image and its circumscribed disk GAP px clear of every
    ``(cy, cx, extent)`` of ``placed``; None after PLACEMENT_TRIES uniform draws.
    An object too large for the image is centred (not reached with R_MAX)."""
    lo, hi = min(extent, (size - 1) / 2), max(size - 1 - extent, (size - 1) / 2)
    for _ in range(PLACEMENT_TRIES):
        cy, cx = rng.uniform(lo, hi, 2)
        if all(np.hypot(cy - y, cx - x) >= extent + e + GAP for y, x, e in placed):
            return float(cy), float(cx)
    return None


def sample_objects(rng: np.random.Generator, size: int,
                   background: np.ndarray) -> list[ShapeSpec]:
    """Up to MAX_OBJECTS random objects, whole and apart (`place`), largest first.

    The count (1..MAX_OBJECTS), then per object class, log-uniform size and shading
    direction are independent; objects are placed largest first, so a small one is
    the one left out when there is no room. The colour is uniform, redrawn (up to 10
    times) until it is MIN_CONTRAST away from the background under the object's
    centre.
    """
    drawn = []
    for _ in range(rng.integers(1, MAX_OBJECTS + 1)):
        label = int(rng.integers(1, NUM_CLASSES))
        radius = float(np.exp(rng.uniform(np.log(R_MIN), np.log(R_MAX))))
        drawn.append((label, radius, float(rng.uniform(0, 2 * np.pi))))
    drawn.sort(key=lambda d: -d[1])
    objects, placed = [], []
    for label, radius, shade_angle in drawn:
        h = half_extent(label, radius)
        centre = place(rng, size, h, placed)
        if centre is None:
            continue
        cy, cx = centre
        placed.append((cy, cx, h))
        under = background[int(round(cy)), int(round(cx))]
        for _ in range(10):   # a colour that stands out from the background
            color = rng.uniform(0, 255, 3)
            if np.linalg.norm(color - under) >= MIN_CONTRAST:
                break
        shading = rng.uniform(-25, 25, 3)
        objects.append(ShapeSpec(label, cy, cx, radius, UPRIGHT_ANGLE[label], color,
                                 shading, shade_angle))
    return objects


def render(objects: list[ShapeSpec], background: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Draws `objects` in order over `background`.

    Args:
      objects: shapes, drawn in this order (later on top).
      background: [S, S, 3] float colour field.
    Returns:
      image [S, S, 3] float (no noise yet) and label [S, S] uint8 with
      0 background, 1..3 object classes and 255 on a ~2 px band along each
      object's outline.
    """
    image = background.copy()
    size = image.shape[0]
    label = np.zeros((size, size), np.uint8)
    for obj in objects:
        h = half_extent(obj.label, obj.radius) + 2   # + room for the band
        y0, y1 = max(int(obj.cy - h), 0), min(int(obj.cy + h) + 2, size)
        x0, x1 = max(int(obj.cx - h), 0), min(int(obj.cx + h) + 2, size)
        dy = np.arange(y0, y1)[:, None] - obj.cy
        dx = np.arange(x0, x1)[None, :] - obj.cx
        dy, dx = np.broadcast_arrays(dy, dx)
        inside = shape_mask(obj.label, obj.radius, obj.angle, dy, dx)
        # Band: within one pixel of the boundary, on either side. erode() counts
        # outside the box as inside, so an object cut by the image frame gets
        # no band along the frame (the box reaches past the object elsewhere).
        grown, core = dilate(inside), erode(inside)
        ramp = (np.cos(obj.shade_angle) * dx + np.sin(obj.shade_angle) * dy) / h
        colour = obj.color + obj.shading * ramp[..., None]
        image[y0:y1, x0:x1][inside] = colour[inside]
        box = label[y0:y1, x0:x1]
        box[grown & ~core] = VOC_IGNORE_LABEL
        box[core] = obj.label
    return image, label


def example_rng(split: str, index: int) -> np.random.Generator:
    """The generator for example `index` of `split` (a pure function of both)."""
    return np.random.default_rng([zlib.crc32(split.encode()), index])


def generate_example(split: str, index: int, size: int = IMAGE_SIZE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Example `index` of `split`: image [S, S, 3] uint8, label [S, S] uint8."""
    rng = example_rng(split, index)
    background = draw_background(rng, size)
    objects = sample_objects(rng, size, background)
    image, label = render(objects, background)
    image += 6 * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, label


# ---------------------------------------------------------------- builder -----


@dataclasses.dataclass(eq=False)
class ScaleShapesConfig(tfds.core.BuilderConfig):
    """Split sizes and image side of a `scale_shapes` variant."""

    train_size: int = TRAIN_SIZE
    val_size: int = VAL_SIZE
    image_size: int = IMAGE_SIZE


DEFAULT_CONFIG = ScaleShapesConfig(
    name="default",
    description=f"{TRAIN_SIZE} train / {VAL_SIZE} val images, "
                f"{IMAGE_SIZE}x{IMAGE_SIZE}.")


def shapes_config(train_size: int = 0, val_size: int = 0,
                  image_size: int = IMAGE_SIZE) -> ScaleShapesConfig:
    """The config with these sizes (0 = default); the default one if all are.

    Non-default sizes get their own name (e.g. ``train16_val8``), hence their
    own folder, so they never clash with the default dataset.
    """
    train_size = train_size or TRAIN_SIZE
    val_size = val_size or VAL_SIZE
    if (train_size, val_size, image_size) == (TRAIN_SIZE, VAL_SIZE, IMAGE_SIZE):
        return DEFAULT_CONFIG
    if min(train_size, val_size) < 0 or image_size < 16:
        raise ValueError(f"bad scale_shapes sizes: train={train_size} "
                         f"val={val_size} image={image_size}")
    name = f"train{train_size}_val{val_size}"
    if image_size != IMAGE_SIZE:
        name += f"_size{image_size}"
    return ScaleShapesConfig(
        name=name, train_size=train_size, val_size=val_size,
        image_size=image_size,
        description=f"{train_size} train / {val_size} val images, "
                    f"{image_size}x{image_size}.")


class ScaleShapes(tfds.core.GeneratorBasedBuilder):
    """Circles, squares and triangles of sizes spanning 16x (see module doc)."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "2.0.0": "Upright squares and triangles; shading in its own direction.",
                     "3.0.0": "Objects whole and apart; radius 2.5-40 px."}
    BUILDER_CONFIGS = [DEFAULT_CONFIG]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "segmentation": tfds.features.Image(shape=(None, None, 1)),
                "image_id": tfds.features.Text(),
            }),
            supervised_keys=("image", "segmentation"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.train_size),
            "val": self._generate_examples("val", cfg.val_size),
        }

    def _generate_examples(self, split: str, count: int):
        size = self.builder_config.image_size
        for index in range(count):
            image, label = generate_example(split, index, size)
            image_id = f"{split}_{index:05d}"
            yield image_id, {
                "image": image,
                "segmentation": label[..., None],
                "image_id": image_id,
            }
