"""Training augmentation on the accelerator: random rescale, pad, crop and flip.

With ``data.augment_on='device'`` the host pipeline only decodes: each train image
arrives at the top-left of a uint8 canvas with its true size
(`data.pipeline.put_on_canvas`), and `train_augment`, called at the start of the
train step (`steps.train_step(..., augment=...)`), turns the canvas batch into the
crops the model trains on. The recipe is the host one (`data.pipeline.augment`):

* scale ``s ~ U(data.scale_range)`` (``s = low`` when ``low == high``), or, when
  ``data.scale_set`` is not empty, ``s`` drawn uniformly from that set (DeepLab-v2's
  discrete rescaling); the image is
  resized to ``(h', w') = max(round((h, w) * s), 1)`` (round half to even), bilinear
  with half-pixel centres for the image and nearest (source pixel
  ``floor((i + 1/2) * h / h')``) for the label, the arithmetic of TensorFlow's
  ``tf.image.resize``;
* padded to at least the crop, the resized image at a uniformly random offset
  (``top`` in ``[0, pad_h]``, ``left`` in ``[0, pad_w]``); the padding is the mean
  pixel (0 after normalisation) and the ignore label;
* cropped at a uniformly random corner (``y0`` in ``[0, h' + pad_h - crop]``, ``x0``
  likewise);
* mirrored horizontally with probability 1/2 (``data.flip``).

Resize, pad, crop and flip are two matrix products per image: output pixel ``(i, j)``
is resized pixel ``(y0 + i - top, x0 + j' - left)`` (``j' = crop - 1 - j`` when
mirrored), and the bilinear resize is separable, so the crop is ``Wy @ canvas @ Wx^T``
with ``Wy [crop, S]`` holding, in row ``i``, the two source-row weights of output row
``i`` (``Wx`` likewise for columns, the mirroring in its row order); the label is the
same product with one-hot (nearest) rows, exact for label values (one term per sum).
Nothing of size ``h' x w'`` is built, so every shape is static (``[b, crop, crop,
...]``) whatever the draw. The products run at full float32 precision (`PRECISION`).

Why products and not a gather of the source pixels (this module's first form): a TPU
has no cheap per-element gather. XLA:TPU lowers a gather of single pixels to one slice
per output pixel, and counts 59 GB of memory traffic for a v5e to augment 8 images of
a 512² canvas to 321² crops (`compiled.cost_analysis()`), 7x the rest of the VGG train
step; the products count 0.15 GB and 8.8 GFLOP, a fraction of a millisecond of the chip
(docs/preflight.md, "Device augmentation on a TPU").

Randomness. Example ``n`` of the global batch of step ``t`` draws from
``fold_in(fold_in(fold_in(K, t), AUGMENT_STREAM), n)``, ``K`` being the run's base key
as a threefry2x32 key (`threefry_key`). ``n`` is the example's index in the global
batch (under pmap, device ``d``'s slice starts at ``d * b_local``), so the crops
depend neither on the number of devices nor on the parallel mode, and a resumed run
draws the same crops (the key is a function of the step). The draws use threefry
whatever ``config.prng_impl`` says: the 'rbg' generators draw through XLA's
RngBitGenerator, whose numbers for one key change with the size of the vmapped batch
around it, which would tie the crops to the device split. `AUGMENT_STREAM` keeps
these keys apart from the keys the step derives for dropout.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from scaleattn import config as config_lib

AUGMENT_STREAM = 0x61756700  # far above any device or micro-batch index
PRECISION = jax.lax.Precision.HIGHEST  # float32 products (a TPU's default is bf16 passes)


class Draw(NamedTuple):
    """The random choices for one example (int32 unless noted)."""
    resized: jnp.ndarray  # [2]: (h', w'), the rescaled size
    offset: jnp.ndarray   # [2]: (top, left) of the resized image in the padded one
    corner: jnp.ndarray   # [2]: (y0, x0) of the crop in the padded image
    flip: jnp.ndarray     # [] bool: mirror the crop


def draw(key: jax.Array, size: jnp.ndarray, *, crop_size: int,
         scale_range: tuple[float, float], flip: bool, scale_set: tuple[float, ...] = ()
         ) -> Draw:
    """The random choices for an image of ``size`` = int32 ``[2]`` (h, w); the scale
    from ``scale_set`` (uniformly) when it is not empty, else from ``scale_range``."""
    k_scale, k_top, k_left, k_y, k_x, k_flip = jax.random.split(key, 6)
    low, high = scale_range
    if scale_set:
        choices = jnp.asarray(scale_set, jnp.float32)
        scale = choices[jax.random.randint(k_scale, (), 0, len(scale_set))]
    elif high > low:
        scale = jax.random.uniform(k_scale, (), jnp.float32, low, high)
    else:
        scale = jnp.float32(low)
    resized = jnp.maximum(jnp.round(size.astype(jnp.float32) * scale).astype(jnp.int32), 1)
    pad = jnp.maximum(crop_size - resized, 0)
    offset = jnp.stack([jax.random.randint(k_top, (), 0, pad[0] + 1),
                        jax.random.randint(k_left, (), 0, pad[1] + 1)])
    slack = resized + pad - crop_size
    corner = jnp.stack([jax.random.randint(k_y, (), 0, slack[0] + 1),
                        jax.random.randint(k_x, (), 0, slack[1] + 1)])
    flipped = jax.random.bernoulli(k_flip) if flip else jnp.array(False)
    return Draw(resized, offset.astype(jnp.int32), corner.astype(jnp.int32), flipped)


def _bilinear_taps(out: jnp.ndarray, in_size, out_size):
    """Source rows (lower, upper) and weight of the upper one, for output rows ``out``
    of a resize from ``in_size`` to ``out_size`` (half-pixel centres, clamped)."""
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    src = (out.astype(jnp.float32) + 0.5) * scale - 0.5
    floor = jnp.floor(src)
    lower = jnp.clip(floor.astype(jnp.int32), 0, in_size - 1)
    upper = jnp.clip(jnp.ceil(src).astype(jnp.int32), 0, in_size - 1)
    return lower, upper, src - floor


def _nearest_tap(out: jnp.ndarray, in_size, out_size) -> jnp.ndarray:
    """Source row of each output row ``out`` (nearest, half-pixel centres, clamped)."""
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    return jnp.clip(jnp.floor((out.astype(jnp.float32) + 0.5) * scale).astype(jnp.int32),
                    0, in_size - 1)


def _bilinear_matrix(out: jnp.ndarray, in_size, out_size, canvas: int) -> jnp.ndarray:
    """float32 ``[len(out), canvas]``: row ``k`` holds the weights of the two source rows
    of output row ``out[k]`` of a bilinear resize from ``in_size`` to ``out_size``."""
    lower, upper, weight = _bilinear_taps(out, in_size, out_size)
    return (jax.nn.one_hot(lower, canvas) * (1.0 - weight)[:, None]
            + jax.nn.one_hot(upper, canvas) * weight[:, None])


def apply(image: jnp.ndarray, label: jnp.ndarray, size: jnp.ndarray, choice: Draw, *,
          crop_size: int, mean, std, ignore_label: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One example's crop for the choices ``choice`` (two matrix products each for the
    image and the label; module docstring).

    Args:
      image: uint8 ``[S, S, 3]`` canvas, the image in its top-left ``size`` corner.
      label: uint8 (or int) ``[S, S]``, same placement.
      size: int32 ``[2]``, the image's (h, w).
      choice: a `Draw`.
      crop_size: the output side.
      mean, std: per-channel pixel statistics (0..255 RGB).
      ignore_label: the label of padding.
    Returns:
      image float32 ``[crop, crop, 3]`` normalised (padding 0 = the mean pixel), label
      int32 ``[crop, crop]`` (padding ``ignore_label``).
    """
    h, w = size[0], size[1]
    rh, rw = choice.resized[0], choice.resized[1]
    steps = jnp.arange(crop_size, dtype=jnp.int32)
    rows = choice.corner[0] + steps - choice.offset[0]
    cols = choice.corner[1] + jnp.where(choice.flip, crop_size - 1 - steps, steps) \
        - choice.offset[1]
    inside = (((rows >= 0) & (rows < rh))[:, None] & ((cols >= 0) & (cols < rw))[None, :])

    weights_y = _bilinear_matrix(rows, h, rh, image.shape[0])  # [crop, S]
    weights_x = _bilinear_matrix(cols, w, rw, image.shape[1])  # [crop, S]
    out = jnp.einsum("iy,yxc->ixc", weights_y, image.astype(jnp.float32), precision=PRECISION)
    out = jnp.einsum("jx,ixc->ijc", weights_x, out, precision=PRECISION)
    out = (out - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    out = jnp.where(inside[..., None], out, 0.0)

    pick_y = jax.nn.one_hot(_nearest_tap(rows, h, rh), label.shape[0])  # [crop, S]
    pick_x = jax.nn.one_hot(_nearest_tap(cols, w, rw), label.shape[1])  # [crop, S]
    nearest = jnp.einsum("iy,yx,jx->ij", pick_y, label.astype(jnp.float32), pick_x,
                         precision=PRECISION)
    out_label = jnp.where(inside, jnp.round(nearest).astype(jnp.int32), ignore_label)
    return out, out_label


def augment_batch(batch: dict, keys: jax.Array, *, crop_size: int,
                  scale_range: tuple[float, float], flip: bool, mean, std,
                  ignore_label: int, scale_set: tuple[float, ...] = ()) -> dict:
    """``{'image': uint8 [b, S, S, 3], 'label': uint8 [b, S, S], 'size': int32 [b, 2]}``
    and one key per example (``keys [b, ...]``) -> ``{'image': float32 [b, crop, crop,
    3], 'label': int32 [b, crop, crop]}`` (`draw` then `apply`, per example)."""
    def one(image, label, size, key):
        choice = draw(key, size, crop_size=crop_size, scale_range=scale_range, flip=flip,
                      scale_set=scale_set)
        return apply(image, label, size, choice, crop_size=crop_size, mean=mean, std=std,
                     ignore_label=ignore_label)
    image, label = jax.vmap(one)(batch["image"], batch["label"], batch["size"], keys)
    return {"image": image, "label": label}


def global_indices(local_batch: int, replicas) -> jnp.ndarray:
    """int32 ``[b]``: the indices, in the global batch, of the ``b`` examples this replica
    holds (``replicas`` a `parallel.Replicas`): under pmap, replica ``d`` holds
    ``[d * b, (d + 1) * b)``; with one replica (jit, sharded: the step sees the global
    batch) ``[0, b)``."""
    return replicas.index() * local_batch + jnp.arange(local_batch, dtype=jnp.int32)


def threefry_key(rng: jax.Array) -> jax.Array:
    """A threefry2x32 key made from every word of ``rng`` (a raw ``uint32`` key of any
    implementation, e.g. ``[4]`` for 'rbg', or a typed key)."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    words = jnp.asarray(rng).astype(jnp.uint32).reshape(-1)
    key = jax.random.wrap_key_data(words[:2], impl="threefry2x32")
    for i in range(2, words.shape[0]):
        key = jax.random.fold_in(key, words[i])
    return key


def example_keys(rng: jax.Array, step, indices: jnp.ndarray) -> jax.Array:
    """One threefry key per example: ``fold_in(fold_in(fold_in(threefry_key(rng), step),
    AUGMENT_STREAM), n)`` for each global index ``n`` of ``indices [b]``."""
    base = jax.random.fold_in(jax.random.fold_in(threefry_key(rng), step), AUGMENT_STREAM)
    return jax.vmap(lambda n: jax.random.fold_in(base, n))(indices)


def train_augment(batch: dict, rng: jax.Array, step, replicas, *,
                  crop_size: int, scale_range: tuple[float, float], flip: bool, mean, std,
                  ignore_label: int, scale_set: tuple[float, ...] = ()) -> dict:
    """A canvas batch (this replica's slice; ``replicas`` a `parallel.Replicas`) -> its
    crops at ``step`` (keys: see the module docstring; shapes as in `augment_batch`)."""
    indices = global_indices(batch["image"].shape[0], replicas)
    return augment_batch(batch, example_keys(rng, step, indices), crop_size=crop_size,
                         scale_range=scale_range, flip=flip, mean=mean, std=std,
                         ignore_label=ignore_label, scale_set=scale_set)


def from_config(config: ml_collections.ConfigDict) -> Callable | None:
    """``augment(batch, rng, step, replicas)`` for `steps.train_step` when
    ``data.augment_on='device'``, else ``None`` (the host pipeline augments)."""
    data = config.data
    config_lib.check_choice("data.augment_on", data.augment_on)
    if data.augment_on != "device":
        return None
    return functools.partial(
        train_augment, crop_size=int(data.crop_size),
        scale_range=(float(data.scale_range[0]), float(data.scale_range[1])),
        scale_set=tuple(float(s) for s in data.scale_set), flip=bool(data.flip), mean=tuple(float(m) for m in data.mean),
        std=tuple(float(s) for s in data.std), ignore_label=int(config.loss.ignore_label))
