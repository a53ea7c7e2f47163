"""Fully connected CRF post-processing (Krähenbühl & Koltun, NIPS 2011) as DeepLab uses it.

The model, for the pixels ``i`` of one image and labels ``l`` in ``0 .. C-1``::

    E(x) = sum_i U_i(x_i) + sum_{i<j} [x_i != x_j] (w_a k_a(i, j) + w_s k_s(i, j))

* unary ``U_i(l) = -log P_i(l)``, ``P`` the network's class probabilities at the image
  size (softmax of the merged scores, bilinearly upsampled; or the average of
  multi-scale + flip inference);
* appearance (bilateral) kernel ``k_a = exp(-|p_i - p_j|^2 / 2 theta_alpha^2
  - |I_i - I_j|^2 / 2 theta_beta^2)``, positions ``p`` in pixels, colours ``I`` in
  0..255 RGB; smoothness kernel ``k_s = exp(-|p_i - p_j|^2 / 2 theta_gamma^2)``;
* Potts compatibility ``[x_i != x_j]``.

Mean-field inference starts from ``Q = P`` and repeats ``iterations`` times::

    Q_i(l) <- softmax_l( log P_i(l) + sum_m w_m sum_j K~_m(i, j) Q_j(l) )

(the Potts message up to a per-pixel constant), ``K`` including ``i = j`` and
``D = diag(K 1)`` (each pixel's kernel sum). ``normalization`` says which ``K~``:

* ``'row'``: ``K~ = D^-1 K``, each pixel's message divided by its own kernel sum.
  The 2011 release of Krähenbühl's code (the NIPS 2011 paper's), which DeepLab's
  ``densecrf`` is modified from: its ``PottsPotential`` multiplies the filtered
  ``Q`` by ``1 / (K 1)`` (``per_pixel_normalization``). DeepLab's published CRF
  rows and parameter values (v1 and v2) come from it.
* ``'symmetric'``: ``K~ = D^-1/2 K D^-1/2``, the default of the 2013 release (v2.2,
  ``NORMALIZE_SYMMETRIC``) that pydensecrf wraps; what parameters tuned with
  pydensecrf (e.g. for PyTorch reproductions) assume.

The two give the same fixed point only for constant kernel sums; parameter values
mean the same only with the normalisation they were tuned with.

How the two filterings are computed:

* appearance: a permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) over
  the 5-D features ``(x / theta_alpha, y / theta_alpha, r / theta_beta, ...)``: every
  pixel is splatted onto the ``d + 1`` vertices of its enclosing simplex with
  barycentric weights, the lattice is blurred with ``[1/2, 1, 1/2]`` along each of its
  ``d + 1`` axes, and the pixels read their vertices back. The vertices are found by
  sorting their integer keys (not a hash table), and a vertex's neighbours by binary
  search in the sorted keys, so everything has static shapes and runs under ``jit``
  on any device. ``capacity`` bounds the number of vertices: ``H * W * (d + 1)``
  always suffices; `fitted_capacity` gives a tighter one (a power of two) from
  `count_vertices`, which makes the filtering several times faster on a CPU;
* smoothness: the exact Gaussian on the pixel grid as two 1-D convolutions
  (taps up to ``4 theta_gamma``).

``valid`` marks the pixels of the image inside a padded array (the eval pipeline pads
to ``data.eval_size``): other pixels send no message and keep their input
probabilities, so the image's result equals that of a CRF run on the cropped image.
`tests/test_crf.py` checks the whole against an exact O(N^2) numpy CRF on tiny images.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from scaleattn import config as config_lib
from scaleattn import metrics

# A key coordinate that no lattice vertex has: marks pixels outside the image and the
# unused rows of the vertex table (they sort after every real key).
_ABSENT = 2 ** 30
_MIN_CAPACITY = 1024
FEATURE_DIMS = 5  # x, y, r, g, b


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """The CRF's parameters: the ``crf.*`` config keys of the same names.

    The defaults live in `scaleattn.config.base_config` (DeepLab-LargeFOV's values).
    """
    iterations: int
    bilateral_weight: float      # w_a
    bilateral_xy_std: float      # theta_alpha, pixels
    bilateral_rgb_std: float     # theta_beta, 0..255 intensity
    gaussian_weight: float       # w_s
    gaussian_xy_std: float       # theta_gamma, pixels
    normalization: str = "row"   # 'row' (2011 release, DeepLab) | 'symmetric' (2013 release)

    @classmethod
    def from_config(cls, crf_config) -> "CRFParams":
        """From the config's ``crf`` section (checked by `scaleattn.config.validate`)."""
        return cls(**{field.name: field.type(crf_config[field.name])
                      for field in dataclasses.fields(cls)})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ the lattice ---


def elevate(features: jnp.ndarray) -> jnp.ndarray:
    """``[N, d]`` features -> ``[N, d + 1]`` coordinates on the plane ``sum = 0``.

    The projection of Adams et al. (their matrix ``E``), scaled so that the lattice
    blur approximates a Gaussian of standard deviation 1 in feature units.
    """
    d = features.shape[1]
    scale = math.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt((np.arange(d) + 1.0) * (np.arange(d) + 2.0))
    scaled = features * jnp.asarray(scale, features.dtype)                         # [N, d]
    zero = jnp.zeros_like(scaled[:, :1])
    tail_sums = jnp.concatenate([jnp.cumsum(scaled[:, ::-1], axis=1)[:, ::-1], zero], 1)
    previous = jnp.concatenate([zero, scaled], 1)                                  # [N, d + 1]
    return tail_sums - jnp.arange(d + 1, dtype=features.dtype) * previous


def enclosing_simplex(elevated: jnp.ndarray):
    """The simplex of the lattice that holds each point.

    Args:
      elevated: ``[N, d + 1]`` from `elevate`.
    Returns:
      ``keys int32 [N, d + 1, d]`` (the first ``d`` lattice coordinates of the
      simplex's ``d + 1`` vertices; the last coordinate is minus their sum) and
      ``weights float32 [N, d + 1]`` (barycentric weights, summing to 1).
    """
    n, dims = elevated.shape
    d = dims - 1
    nearest = jnp.round(elevated / dims)              # nearest point of remainder 0 ...
    base = nearest * dims
    offset_sum = jnp.sum(nearest, axis=1, keepdims=True)
    residual = elevated - base
    # rank[i]: how many coordinates have a larger residual (ties broken by index).
    index = np.arange(dims)
    later = index[None, :] > index[:, None]                                        # [i, j]
    larger = jnp.where(later, residual[:, None, :] > residual[:, :, None],
                       residual[:, None, :] >= residual[:, :, None])
    larger &= ~np.eye(dims, dtype=bool)
    rank = jnp.sum(larger, axis=2) + offset_sum.astype(jnp.int32)
    # ... moved along (1, .., 1, -d, ..) so that the point lies in its simplex.
    wrap = (rank < 0).astype(jnp.int32) - (rank > d).astype(jnp.int32)
    rank = rank + dims * wrap
    base = base + dims * wrap
    share = (elevated - base) / dims
    corner = jax.nn.one_hot(d - rank, d + 2, dtype=elevated.dtype)                 # [N, i, d+2]
    next_corner = jax.nn.one_hot(d - rank + 1, d + 2, dtype=elevated.dtype)
    barycentric = jnp.einsum("nik,ni->nk", corner - next_corner, share)
    weights = jnp.concatenate([barycentric[:, :1] + 1.0 + barycentric[:, d + 1:],
                               barycentric[:, 1:d + 1]], axis=1)
    remainder = np.arange(dims)
    keys = (base[:, None, :d].astype(jnp.int32) + remainder[None, :, None]
            - dims * (rank[:, None, :d] > (d - remainder)[None, :, None]))
    return keys, weights


def lex_less(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``[...]`` bool: whether rows ``a [..., d]`` sort before rows ``b`` (column 0 first)."""
    differs = a != b
    first = jnp.argmax(differs, axis=-1)[..., None]
    return jnp.any(differs, axis=-1) & jnp.take_along_axis(a < b, first, axis=-1)[..., 0]


def find_rows(table: jnp.ndarray, queries: jnp.ndarray) -> jnp.ndarray:
    """Index of each query row in ``table`` (sorted by `lex_less`), ``len(table)`` if absent.

    Args:
      table: ``int32 [M, d]``, sorted, no duplicates.
      queries: ``int32 [Q, d]``.
    Returns:
      ``int32 [Q]``.
    """
    table, queries = jnp.asarray(table), jnp.asarray(queries)
    size = table.shape[0]

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        below = lex_less(table[jnp.minimum(middle, size - 1)], queries) & (low < high)
        return jnp.where(below, middle + 1, low), jnp.where(below | (low >= high), high, middle)

    low = jnp.zeros(queries.shape[0], jnp.int32)
    low, _ = jax.lax.fori_loop(0, max(1, size.bit_length()), halve,
                               (low, jnp.full_like(low, size)))
    found = jnp.all(table[jnp.minimum(low, size - 1)] == queries, axis=-1)
    return jnp.where(found, low, size)


@dataclasses.dataclass(frozen=True)
class Lattice:
    """The permutohedral lattice of one image's features (a pytree of arrays).

    ``vertex int32 [N, d + 1]``: the row of each pixel's simplex vertices in the
    vertex table (``capacity`` for pixels outside the image: a zero row);
    ``weight float32 [N, d + 1]``: their barycentric weights (0 outside the image);
    ``neighbours int32 [d + 1, 2, capacity]``: each vertex's two neighbours along each
    lattice axis (``capacity`` where absent); ``count int32 []``: vertices in use.
    """
    vertex: jnp.ndarray
    weight: jnp.ndarray
    neighbours: jnp.ndarray
    count: jnp.ndarray


jax.tree_util.register_dataclass(Lattice, data_fields=["vertex", "weight", "neighbours",
                                                       "count"], meta_fields=[])


def sorted_vertices(features: jnp.ndarray, valid: jnp.ndarray):
    """The simplex vertices of the valid pixels, sorted and numbered.

    Returns ``(keys [N, d+1, d], weights [N, d+1], order [N(d+1)], sorted keys
    [N(d+1), d], number [N(d+1)] of each sorted key among the distinct ones, count)``.
    """
    keys, weights = enclosing_simplex(elevate(features))
    keys = jnp.where(valid[:, None, None], keys, _ABSENT)
    d = keys.shape[-1]
    flat = keys.reshape(-1, d)
    order = jnp.lexsort(tuple(flat[:, k] for k in reversed(range(d))))  # column 0 first
    ordered = flat[order]
    new = jnp.concatenate([jnp.ones((1,), bool), jnp.any(ordered[1:] != ordered[:-1], -1)])
    number = jnp.cumsum(new.astype(jnp.int32)) - 1
    count = jnp.sum(new & (ordered[:, 0] != _ABSENT)).astype(jnp.int32)
    return keys, weights, order, ordered, number, count


def build_lattice(features: jnp.ndarray, valid: jnp.ndarray, capacity: int) -> Lattice:
    """`Lattice` of ``features float32 [N, d]`` over the pixels where ``valid [N]``.

    ``capacity`` (static) must be at least the number of distinct vertices
    (`count_vertices`); vertices beyond it are dropped.
    """
    keys, weights, order, ordered, number, count = sorted_vertices(features, valid)
    n, dims, d = keys.shape
    real = ordered[:, 0] != _ABSENT
    row = jnp.where(real & (number < capacity), number, capacity)
    vertex = jnp.zeros(n * dims, jnp.int32).at[order].set(row).reshape(n, dims)
    weights = jnp.where((vertex < capacity) & valid[:, None], weights, 0.0)
    table = jnp.full((capacity, d), _ABSENT, jnp.int32).at[row].set(ordered, mode="drop")
    steps = []
    for axis in range(dims):  # along axis j: all coordinates +-1, coordinate j -+d
        step = np.ones(d, np.int32)
        if axis < d:
            step[axis] = -d
        steps.append(step)
    steps = jnp.asarray(np.stack(steps))                                           # [d+1, d]
    queries = jnp.stack([table[None] - steps[:, None], table[None] + steps[:, None]], 1)
    neighbours = find_rows(table, queries.reshape(-1, d)).reshape(dims, 2, capacity)
    return Lattice(vertex, weights, neighbours, count)


def lattice_filter(values: jnp.ndarray, lattice: Lattice) -> jnp.ndarray:
    """Splat ``values [N, C]`` onto the lattice, blur, slice: ``[N, C]``.

    Approximates ``sum_j exp(-|f_i - f_j|^2 / 2) values_j`` up to a constant factor
    (which both normalisations cancel).
    """
    capacity = lattice.neighbours.shape[-1]
    channels = values.shape[-1]
    contributions = lattice.weight[..., None] * values[:, None, :]                # [N, d+1, C]
    grid = jax.ops.segment_sum(contributions.reshape(-1, channels),
                               lattice.vertex.reshape(-1), num_segments=capacity)
    zero_row = jnp.zeros((1, channels), values.dtype)
    for axis in range(lattice.neighbours.shape[0]):
        padded = jnp.concatenate([grid, zero_row])
        grid = grid + 0.5 * (padded[lattice.neighbours[axis, 0]] +
                             padded[lattice.neighbours[axis, 1]])
    padded = jnp.concatenate([grid, zero_row])
    return jnp.einsum("nk,nkc->nc", lattice.weight, padded[lattice.vertex])


# ------------------------------------------------------------------ the CRF ---


def bilateral_features(image: jnp.ndarray, xy_std, rgb_std) -> jnp.ndarray:
    """``[H, W, 3]`` RGB (0..255) -> ``[H * W, 5]`` ``(x, y) / xy_std, (r, g, b) / rgb_std``."""
    h, w = image.shape[:2]
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
    position = jnp.stack([x, y], -1) / xy_std
    return jnp.concatenate([position, image.astype(jnp.float32) / rgb_std],
                           -1).reshape(h * w, FEATURE_DIMS)


def gaussian_radius(std: float, size: int) -> int:
    """Taps of the smoothness filter on each side: ``ceil(4 std)``, at most ``size - 1``."""
    return max(0, min(math.ceil(4.0 * std), size - 1))


def gaussian_filter(values: jnp.ndarray, std, radius_hw: tuple[int, int]) -> jnp.ndarray:
    """``sum_j exp(-|p_i - p_j|^2 / 2 std^2) values_j`` over the grid: ``[H, W, C]``.

    Exact for pixels up to ``radius_hw`` apart in each direction; zero outside the
    array (so only pixels of the array contribute). Shifted adds, one axis after the
    other (XLA fuses them into one pass per axis; a convolution with one input and
    one output channel is ten times slower on a CPU).
    """
    for axis, radius in enumerate(radius_hw):
        size = values.shape[axis]
        padding = [(0, 0)] * values.ndim
        padding[axis] = (radius, radius)
        padded = jnp.pad(values, padding)
        out = jnp.zeros_like(values)
        for offset in range(-radius, radius + 1):
            tap = jnp.exp(-0.5 * (offset / std) ** 2)
            out = out + tap * jax.lax.slice_in_dim(padded, radius + offset,
                                                   radius + offset + size, axis=axis)
        values = out
    return values


def normalizations(mask: jnp.ndarray, kernel_sums: jnp.ndarray, normalization: str):
    """``(before, after)``: the message is ``after * K(before * Q)``.

    ``mask`` (1 inside the image, 0 outside) and ``kernel_sums = K mask`` have one
    shape. 'row': ``(mask, mask / K1)``; 'symmetric': both ``mask / sqrt(K1)``.
    """
    config_lib.check_choice("crf.normalization", normalization)
    if normalization == "row":
        return mask, mask / (kernel_sums + 1e-20)
    scale = mask * jax.lax.rsqrt(kernel_sums + 1e-20)
    return scale, scale


def _mean_field(log_probs, image, valid, bilateral_weights, bilateral, gaussian, *,
                iterations: int, radius_hw: tuple[int, int], capacity: int,
                normalization: str) -> jnp.ndarray:
    """One image: ``[K, H, W, C]`` marginals (see the module docstring), one for each of
    the ``K`` appearance weights ``bilateral_weights [K]`` (one lattice serves them all).

    ``bilateral = (theta_alpha, theta_beta)``, ``gaussian = (w_s, theta_gamma)``
    (traced, so a parameter search does not recompile); ``normalization`` (static):
    'row' or 'symmetric'.
    """
    h, w, c = log_probs.shape
    features = bilateral_features(image, bilateral[0], bilateral[1])
    inside = valid.reshape(h * w)
    lattice = build_lattice(features, inside, capacity)
    mask = inside.astype(jnp.float32)[:, None]
    grid_mask = mask.reshape(h, w, 1)
    # message = after * K(before * Q): the scalings of `normalizations`, zero outside.
    lattice_before, lattice_after = normalizations(
        mask, lattice_filter(mask, lattice), normalization)                        # [N, 1]
    grid_before, grid_after = normalizations(
        grid_mask, gaussian_filter(grid_mask, gaussian[1], radius_hw), normalization)
    log_probs = log_probs.astype(jnp.float32)

    start = jax.nn.softmax(log_probs)

    def marginals(weight):
        def update(q, _):
            appearance = lattice_after * lattice_filter(
                lattice_before * q.reshape(h * w, c), lattice)
            smoothness = grid_after * gaussian_filter(grid_before * q, gaussian[1], radius_hw)
            return jax.nn.softmax(log_probs + weight * appearance.reshape(h, w, c)
                                  + gaussian[0] * smoothness), None

        q, _ = jax.lax.scan(update, start, None, length=iterations)
        return jnp.where(valid[..., None], q, start)

    return jax.lax.map(marginals, bilateral_weights)


def check_shapes(log_probs, image, valid) -> None:
    """Raises ValueError unless ``log_probs [B, H, W, C]``, ``image [B, H, W, 3]`` and
    ``valid [B, H, W]`` cover the same pixels (the scores must be at the image size)."""
    if (log_probs.ndim != 4 or image.ndim != 4 or image.shape[-1] != 3
            or tuple(valid.shape) != tuple(log_probs.shape[:3])
            or tuple(image.shape[:3]) != tuple(log_probs.shape[:3])):
        raise ValueError(
            f"CRF inputs disagree: scores {tuple(log_probs.shape)} [B, H, W, C], image "
            f"{tuple(image.shape)} [B, H, W, 3], valid {tuple(valid.shape)} [B, H, W]; "
            f"upsample the scores to the image size first")


def dense_crf(log_probs: jnp.ndarray, image: jnp.ndarray, valid: jnp.ndarray,
              params: CRFParams, capacity: int | None = None) -> jnp.ndarray:
    """Mean-field marginals of the fully connected CRF, image by image.

    Traceable (call it inside ``jit``); `dense_crf_fitted` sizes ``capacity`` first.

    Args:
      log_probs: ``float [B, H, W, C]`` log class probabilities at the image size
        (``log_softmax`` of the upsampled scores, or the log of averaged probabilities).
      image: ``float [B, H, W, 3]`` RGB in 0..255.
      valid: ``bool [B, H, W]``, the pixels of the image (the rest is padding).
      params: `CRFParams`.
      capacity: lattice vertices per image (static); ``None``: ``H * W * 6``, enough
        for any image.
    Returns:
      ``float32 [B, H, W, C]`` marginals; padding pixels keep ``softmax(log_probs)``.
    Raises:
      ValueError: the shapes disagree (`check_shapes`).
    """
    return dense_crf_weights(log_probs, image, valid, params, (params.bilateral_weight,),
                             capacity)[0]


def dense_crf_weights(log_probs, image, valid, params: CRFParams, bilateral_weights,
                      capacity: int | None = None) -> jnp.ndarray:
    """`dense_crf` for several appearance weights at once: ``[K, B, H, W, C]``.

    ``bilateral_weights``: ``K`` values replacing ``params.bilateral_weight``; each
    image's lattice is built once for all of them (what a parameter search needs).
    """
    check_shapes(log_probs, image, valid)
    _, h, w, _ = log_probs.shape
    marginals = _dense_crf(
        log_probs, jnp.asarray(image, jnp.float32), jnp.asarray(valid, bool),
        jnp.asarray(bilateral_weights, jnp.float32).reshape(-1),
        jnp.asarray([params.bilateral_xy_std, params.bilateral_rgb_std], jnp.float32),
        jnp.asarray([params.gaussian_weight, params.gaussian_xy_std], jnp.float32),
        iterations=int(params.iterations),
        radius_hw=(gaussian_radius(params.gaussian_xy_std, h),
                   gaussian_radius(params.gaussian_xy_std, w)),
        capacity=int(capacity or h * w * (FEATURE_DIMS + 1)),
        normalization=str(params.normalization))
    return jnp.swapaxes(marginals, 0, 1)


@functools.partial(jax.jit, static_argnames=("iterations", "radius_hw", "capacity",
                                             "normalization"))
def _dense_crf(log_probs, image, valid, bilateral_weights, bilateral, gaussian, *, iterations,
               radius_hw, capacity, normalization):
    """``[B, K, H, W, C]``: `_mean_field` image by image."""
    one = functools.partial(_mean_field, bilateral_weights=bilateral_weights,
                            bilateral=bilateral, gaussian=gaussian, iterations=iterations,
                            radius_hw=radius_hw, capacity=capacity,
                            normalization=normalization)
    return jax.lax.map(lambda args: one(*args), (log_probs, image, valid))


@jax.jit
def _count_vertices(image, valid, xy_std, rgb_std):
    def one(args):
        single_image, single_valid = args
        features = bilateral_features(single_image, xy_std, rgb_std)
        return sorted_vertices(features, single_valid.reshape(-1))[-1]
    return jax.lax.map(one, (image, valid))


def count_vertices(image: jnp.ndarray, valid: jnp.ndarray, params: CRFParams) -> np.ndarray:
    """``int [B]``: lattice vertices the appearance kernel needs for each image."""
    return np.asarray(_count_vertices(jnp.asarray(image, jnp.float32),
                                      jnp.asarray(valid, bool),
                                      jnp.float32(params.bilateral_xy_std),
                                      jnp.float32(params.bilateral_rgb_std)))


def fitted_capacity(counts) -> int:
    """The power of two (at least 1,024) that holds the largest of ``counts``, so that
    few distinct capacities (hence compilations) occur."""
    largest = max(int(np.max(counts)), 1)
    return max(_MIN_CAPACITY, 1 << (largest - 1).bit_length())


def dense_crf_fitted(log_probs, image, valid, params: CRFParams) -> jnp.ndarray:
    """`dense_crf` with the lattice sized to the batch (`count_vertices`): the same
    result, faster; not traceable (it reads the vertex count on the host)."""
    check_shapes(log_probs, image, valid)
    capacity = fitted_capacity(count_vertices(image, valid, params))
    return dense_crf(log_probs, image, valid, params, capacity=capacity)


# ------------------------------------------------------- inputs from the pipeline ---


def image_rgb(normalized: jnp.ndarray, mean, std) -> jnp.ndarray:
    """``[..., 3]`` normalised image (``(rgb - mean) / std``) -> RGB in 0..255."""
    return normalized * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def padded_image_mask(normalized: jnp.ndarray, label: jnp.ndarray,
                      ignore_label: int) -> jnp.ndarray:
    """``bool [B, H, W]``: the image inside an eval batch's padded square.

    The eval pipeline puts each image top-left and pads below and to the right with
    image 0 (the mean pixel) and label ``ignore_label``
    (`scaleattn.data.pipeline.pad_for_eval`). The image spans the rows and columns up
    to the last one holding a labelled pixel or a pixel that differs from the mean; a
    whole border row of exactly the mean colour and all ignored would be taken for
    padding (impossible for a mean with a fractional channel, like ImageNet's and the
    demo's). A filler example (all padding) has no pixel.
    """
    content = jnp.any(normalized != 0, axis=-1) | (label != ignore_label)         # [B, H, W]

    def extent(any_along):                                                         # [B, n]
        n = any_along.shape[1]
        last = n - jnp.argmax(any_along[:, ::-1], axis=1)
        return jnp.where(jnp.any(any_along, axis=1), last, 0)

    h, w = extent(jnp.any(content, 2)), extent(jnp.any(content, 1))
    rows = jnp.arange(content.shape[1])[None, :, None] < h[:, None, None]
    cols = jnp.arange(content.shape[2])[None, None, :] < w[:, None, None]
    return rows & cols


def log_probs_of(probs: jnp.ndarray) -> jnp.ndarray:
    """The unary's ``log P`` from probabilities (e.g. averaged over scales and flips)."""
    return jnp.log(jnp.maximum(probs, 1e-30))


def eval_batch_marginals(log_probs: jnp.ndarray, normalized: jnp.ndarray, label: jnp.ndarray,
                         params: CRFParams, *, mean, std, ignore_label: int,
                         fitted: bool = False) -> jnp.ndarray:
    """`dense_crf` marginals ``[B, H, W, C]`` of an eval batch.

    ``normalized [B, H, W, 3]`` and ``label [B, H, W]`` are the pipeline's padded batch:
    the RGB comes from undoing the normalisation (``data.mean``, ``data.std``), the
    image's extent from `padded_image_mask`. ``fitted`` (outside ``jit`` only) sizes
    the lattice to the batch (`dense_crf_fitted`).
    """
    image = image_rgb(normalized, mean, std)
    valid = padded_image_mask(normalized, label, ignore_label)
    return (dense_crf_fitted if fitted else dense_crf)(log_probs, image, valid, params)


def scores_with_crf(total: np.ndarray) -> dict:
    """`metrics.scores` of an eval's confusion total.

    ``total`` is ``[C, C]``, or ``[2, C, C]`` = (without the CRF, with it): then the
    result is the CRF's scores with the plain ones under ``'no_crf'``.
    """
    total = np.asarray(total)
    if total.ndim == 2:
        return metrics.scores(total)
    return dict(metrics.scores(total[1]), no_crf=metrics.scores(total[0]))
