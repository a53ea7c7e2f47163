"""Gated Self-Attention Group (GSAG) segmentation heads (seed 004, DESIGN.md §1.2).

The write-up names the pieces but not their wiring. Where it is vague this module
takes the simplest reading that keeps every named piece, as follows.

Pieces (``x`` is a feature map ``[B, h, w, C]``):

1. **Self-attention** (`SelfAttention`, one module for both forms). A "key-query
   linear layer" (one 1x1 conv ``key_query`` with bias, ``2 * dk`` outputs, split into
   key ``[..., :dk]`` and query ``[..., dk:]``) and a "value linear layer" (1x1 conv
   ``value`` with bias, ``dv`` outputs). Attention weights are the softmax over
   positions of ``q_i . k_j / sqrt(dk)`` (scaled dot product; the softmax runs in
   float32); the context at ``i`` is ``sum_j a_ij v_j``.
   * *global* (``window=None``): ``j`` runs over all ``h * w`` positions (non-local).
   * *pointwise* (``window=k``, odd): ``j`` runs over the ``k x k`` window centred on
     ``i``; positions outside the map are excluded (not zero-padded keys). This is the
     global form with a window mask, computed as a sum over the ``k^2`` shifts instead
     of an ``(hw)^2`` matrix (`local_attention`).
   The module returns both the key-query vectors ``[B, h, w, 2 dk]`` and the context
   ``[B, h, w, dv]``.
2. **Vector mapping** (`VectorMapping`): ``concat(key_query, context)`` ->
   dense (``hidden`` units) -> 1x1 conv -> BN -> ReLU. The "key-query vector" is read
   as the key-query layer's output at the pixel, the "value vector" as the attended
   value (the context). The BN (the heads' usual conv-BN-ReLU) is our addition.
3. **Gated pooling** (`GatedPooling`): the local (``window x window``, outside
   positions excluded) and global (per image) mean and variance of every channel
   (`pooling_statistics`), concatenated (``4C``) -> 1x1 conv with bias -> sigmoid: a
   gate ``g`` in (0, 1) per position and channel. "Merges local and global
   information": the head uses it as the weights of a weighted sum
   ``g * local + (1 - g) * global`` (below).
4. **Three-convolution group** (`GSAGHead`), on the backbone features:
   * key layer: ``conv3x3(C) -> BN -> ReLU`` -> ``x1``;
   * query layer: pointwise self-attention on ``x1``, its context projected back to C
     channels by a 1x1 conv (``pointwise_proj``, zero-initialised so that a new head
     starts as the basic head) and added: ``x2 = x1 + proj(context)``;
   * attention-mean-pool layer: global self-attention on ``x2`` (every output is an
     attention-weighted mean of all values), vector-mapped to C channels -> ``m``;
     the gate from ``x2``'s statistics weights the sum ``x3 = g * x2 + (1 - g) * m``.
   The last layer's output is the penultimate representation (``features``), which a
   1x1 conv ``classifier`` (with bias, N(0, 0.01) init) turns into class scores.

Variants (each adds the next layer of the group):
  * ``basic``: key layer only (plain conv3x3-BN-ReLU head);
  * ``incremental``: + the pointwise self-attention (query) layer;
  * ``hybrid``: + the gated global (attention-mean-pool) layer = the full group.

Widths: ``C = channels * width``; ``dk = max(1, C // 8)``; ``dv = max(1, C // 2)``;
vector-mapping hidden units = ``C``. An optional dropout (``dropout``, default 0) sits
before the classifier; ``features`` is taken before it.

Cost: global attention holds a ``[B, hw, hw]`` float32 matrix (a 65x65 map: 71 MB per
image); the pointwise form never builds one.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scaleattn.models import layers

VARIANTS = ("basic", "incremental", "hybrid")

# DeepLab initialises its new classifiers with N(0, 0.01).
classifier_init = nn.initializers.normal(0.01)


def _check_window(window: int) -> None:
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the self-attention / pooling window must be odd and >= 1, "
                         f"got {window}")


def window_shifts(x: jnp.ndarray, window: int) -> list[jnp.ndarray]:
    """The ``window**2`` shifted copies of ``x [B, h, w, C]`` (zeros outside the map).

    Entry ``dy * window + dx`` holds, at ``(i, j)``, ``x[i + dy - r, j + dx - r]`` with
    ``r = window // 2``: the window's neighbours of every position, in raster order.
    """
    _check_window(window)
    r = window // 2
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    return [padded[:, dy:dy + h, dx:dx + w] for dy in range(window) for dx in range(window)]


def window_validity(h: int, w: int, window: int) -> np.ndarray:
    """``[h, w, window**2]`` bool: whether each neighbour of `window_shifts` is inside."""
    _check_window(window)
    r = window // 2
    inside = np.pad(np.ones((h, w), bool), r)
    return np.stack([inside[dy:dy + h, dx:dx + w] for dy in range(window)
                     for dx in range(window)], axis=-1)


def attention_weights(logits: jnp.ndarray, valid: np.ndarray | None = None) -> jnp.ndarray:
    """Softmax over the last axis in float32, ``valid == False`` entries getting weight 0.

    Every row must have at least one valid entry (a pixel always sees itself).
    """
    logits = logits.astype(jnp.float32)
    if valid is not None:
        logits = jnp.where(valid, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def global_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
    """Every position attends to all: ``[B,h,w,d], [B,h,w,d], [B,h,w,dv] -> [B,h,w,dv]``."""
    b, h, w, d = query.shape
    q, k = query.reshape(b, h * w, d), key.reshape(b, h * w, d)
    v = value.reshape(b, h * w, value.shape[-1])
    a = attention_weights(jnp.einsum("bnd,bmd->bnm", q, k) / np.sqrt(d))
    return jnp.einsum("bnm,bmv->bnv", a.astype(v.dtype), v).reshape(value.shape)


def local_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                    window: int) -> jnp.ndarray:
    """Each position attends to its ``window x window`` neighbourhood inside the map.

    ``[B,h,w,d], [B,h,w,d], [B,h,w,dv] -> [B,h,w,dv]``; equal to `global_attention`
    with logits outside the window masked out, in ``O(hw * window^2)`` memory.
    """
    h, w, d = query.shape[1], query.shape[2], query.shape[3]
    logits = jnp.stack([jnp.sum(query * k, axis=-1) for k in window_shifts(key, window)],
                       axis=-1) / np.sqrt(d)                                # [B,h,w,K]
    a = attention_weights(logits, window_validity(h, w, window)).astype(value.dtype)
    return sum(a[..., i:i + 1] * v for i, v in enumerate(window_shifts(value, window)))


def pooling_statistics(x: jnp.ndarray, window: int) -> tuple[jnp.ndarray, ...]:
    """Local and global mean and variance per channel, each ``[B, h, w, C]`` (float32).

    Local: over the ``window x window`` neighbourhood inside the map (the count of inside
    positions divides). Global: over the whole map of each image, broadcast to every
    position. Variances are the biased ``E[x^2] - E[x]^2`` (local; clipped at 0).
    """
    x = x.astype(jnp.float32)
    count = window_validity(x.shape[1], x.shape[2], window).sum(-1)[..., None]  # [h,w,1]
    local_mean = sum(window_shifts(x, window)) / count
    local_var = jnp.maximum(sum(window_shifts(x * x, window)) / count - local_mean ** 2, 0.0)
    global_mean = jnp.broadcast_to(jnp.mean(x, axis=(1, 2), keepdims=True), x.shape)
    global_var = jnp.broadcast_to(jnp.var(x, axis=(1, 2), keepdims=True), x.shape)
    return local_mean, local_var, global_mean, global_var


class SelfAttention(nn.Module):
    """Key-query / value self-attention, global (``window=None``) or windowed.

    ``x [B, h, w, C] -> (key_query [B, h, w, 2 * key_channels],
    context [B, h, w, value_channels])``; the key is ``key_query[..., :key_channels]``.
    """
    key_channels: int
    value_channels: int
    window: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        key_query = layers.conv(2 * self.key_channels, 1, use_bias=True, dtype=self.dtype,
                                name="key_query")(x)
        value = layers.conv(self.value_channels, 1, use_bias=True, dtype=self.dtype,
                            name="value")(x)
        key, query = jnp.split(key_query, 2, axis=-1)
        if self.window is None:
            context = global_attention(query, key, value)
        else:
            context = local_attention(query, key, value, self.window)
        return key_query, context


class VectorMapping(nn.Module):
    """``concat(key_query, context)`` -> dense -> 1x1 conv -> BN -> ReLU: ``[B,h,w,features]``."""
    hidden: int
    features: int
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, key_query: jnp.ndarray, context: jnp.ndarray, *,
                 train: bool) -> jnp.ndarray:
        x = jnp.concatenate([key_query, context.astype(key_query.dtype)], axis=-1)
        x = nn.Dense(self.hidden, dtype=self.dtype, name="dense")(x)
        x = layers.conv(self.features, 1, dtype=self.dtype, name="conv")(x)
        x = layers.batch_norm(train=train, bn_mode=self.bn_mode, axis_name=self.bn_axis_name,
                              dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


class GatedPooling(nn.Module):
    """Gate from local and global statistics: ``x [B,h,w,C] -> g [B,h,w,C]`` in (0, 1)."""
    window: int = 7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stats = jnp.concatenate(pooling_statistics(x, self.window), axis=-1)
        gate = layers.conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype,
                           name="gate")(stats.astype(self.dtype))
        return nn.sigmoid(gate)


class GSAGHead(nn.Module):
    """GSAG segmentation head (see the module docstring for the wiring).

    ``features [B, h, w, Cin] -> {'logits': [B, h, w, num_classes],
    'features': [B, h, w, channels * width]}``; ``features`` is what the classifier
    reads (before the optional dropout).

    Attributes:
      num_classes: classifier outputs.
      variant: 'basic' | 'incremental' | 'hybrid'.
      channels: width of the group before the ``width`` multiplier (512).
      width: channel multiplier (tests: tiny).
      window: odd side of the pointwise-attention and local-pooling window.
      dropout: rate of the dropout before the classifier (0 = none; needs a 'dropout'
        rng when training).
      bn_mode, bn_axis_name: see `layers.batch_norm`.
    """
    num_classes: int
    variant: str = "hybrid"
    channels: int = 512
    width: float = 1.0
    window: int = 7
    dropout: float = 0.0
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> dict:
        if self.variant not in VARIANTS:
            raise ValueError(f"GSAG variant must be one of {VARIANTS}, got {self.variant!r}")
        _check_window(self.window)
        c = max(1, int(self.channels * self.width))
        key_channels, value_channels = max(1, c // 8), max(1, c // 2)

        # Key layer.
        x = layers.conv(c, 3, dtype=self.dtype, name="key_conv")(features)
        x = layers.batch_norm(train=train, bn_mode=self.bn_mode, axis_name=self.bn_axis_name,
                              dtype=self.dtype, name="bn_key")(x)
        x = nn.relu(x)

        # Query layer: pointwise (windowed) self-attention, added residually.
        if self.variant in ("incremental", "hybrid"):
            _, context = SelfAttention(key_channels, value_channels, self.window,
                                       dtype=self.dtype, name="pointwise_attention")(x)
            x = x + layers.conv(c, 1, use_bias=True, dtype=self.dtype,
                                kernel_init=nn.initializers.zeros,
                                name="pointwise_proj")(context)

        # Attention-mean-pool layer: global self-attention, gated against the local path.
        if self.variant == "hybrid":
            key_query, context = SelfAttention(key_channels, value_channels, None,
                                               dtype=self.dtype, name="global_attention")(x)
            global_features = VectorMapping(c, c, bn_mode=self.bn_mode,
                                            bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                                            name="vector_mapping")(key_query, context,
                                                                   train=train)
            gate = GatedPooling(self.window, dtype=self.dtype, name="gated_pooling")(x)
            x = gate * x + (1 - gate) * global_features

        penultimate = x
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                             kernel_init=classifier_init, name="classifier")(x)
        return {"logits": logits, "features": penultimate}
