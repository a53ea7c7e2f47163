"""Gated Self-Attention Group (GSAG) segmentation heads.

`GSAGHead` is a segmentation head on the last stage of a dilated ResNet / ResNeXt.
On a feature map ``x [B, h, w, C]`` (``C = channels * width``, 512 at full size; key
and query have ``dk = C / 8`` channels, values ``dv = C / 2``) it runs up to three
layers, then a 1x1 classifier:

* key layer: ``x1 = ReLU(BN(conv3x3(x)))``; `KeyQueryValue` (``key_qkv``) makes its
  key, query and value when a later layer reads them;
* query layer: ``x2 = x1 + pointwise_proj(local_attention(q, k, v))``, each position
  attending to its ``window x window`` neighbourhood (positions outside the map left
  out); the projection is zero-initialised, so a new incremental head computes what
  the basic one does;
* attention-mean-pool layer: ``x3 = x2 + VectorMapping(key_query, context)`` with the
  image's context vector from `pooled_attention` on ``global_qkv(x2)`` (or, with
  ``global_attention='non_local'``, one context per position), then `GatedPooling`:
  ``x3 * sigmoid(conv1x1(local and global means and variances))``.

Variants (`VARIANTS`): ``basic`` = the key layer, ``incremental`` = + the query layer,
``hybrid`` = + the attention-mean-pool layer. docs/gsag.md reads the GSAG write-up
sentence by sentence against this code and says where the code chose.

Cost: the pooled global attention and the gated pooling are linear in ``h * w``; the
pointwise attention is ``O(h * w * window^2)`` and never builds an attention matrix;
the ``non_local`` option holds a ``[B, hw, hw]`` float32 matrix (71 MB per image for a
65x65 map).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scaleattn import config as config_lib
from scaleattn.models import layers

VARIANTS = config_lib.CHOICES["model.gsag_variant"]
GLOBAL_ATTENTIONS = config_lib.CHOICES["model.gsag_global_attention"]

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


def split_key_query(key_query: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``[..., 2 d] -> (key [..., :d], query [..., d:])``: the key-query layer's two halves."""
    return jnp.split(key_query, 2, axis=-1)


def pooled_attention(query: jnp.ndarray, key: jnp.ndarray,
                     value: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One context vector per image: the attention-weighted mean of all the values.

    ``query, key [B, h, w, d], value [B, h, w, dv] -> (weights [B, h, w], context [B, dv])``:
    the image's query is the mean of its per-position queries, ``qbar = mean_i q_i``;
    position ``j`` gets the weight ``a_j = softmax_j(qbar . k_j / sqrt(d))`` (over all
    ``h * w`` positions, float32) and ``context = sum_j a_j v_j``. Linear in ``h * w``.
    """
    b, h, w, d = key.shape
    image_query = jnp.mean(query.astype(jnp.float32), axis=(1, 2))                 # [B, d]
    logits = jnp.einsum("bhwd,bd->bhw", key.astype(jnp.float32), image_query) / np.sqrt(d)
    weights = attention_weights(logits.reshape(b, h * w)).reshape(b, h, w)
    context = jnp.einsum("bhw,bhwv->bv", weights.astype(value.dtype), value)
    return weights, context


def non_local_attention(query: jnp.ndarray, key: jnp.ndarray,
                        value: jnp.ndarray) -> jnp.ndarray:
    """A context per position, each position attending to all (non-local block).

    ``[B,h,w,d], [B,h,w,d], [B,h,w,dv] -> [B,h,w,dv]``: ``c_i = sum_j a_ij v_j`` with
    ``a_ij = softmax_j(q_i . k_j / sqrt(d))``; holds a ``[B, hw, hw]`` float32 matrix.
    """
    b, h, w, d = query.shape
    q, k = query.reshape(b, h * w, d), key.reshape(b, h * w, d)
    v = value.reshape(b, h * w, value.shape[-1])
    a = attention_weights(jnp.einsum("bnd,bmd->bnm", q, k) / np.sqrt(d))
    return jnp.einsum("bnm,bmv->bnv", a.astype(v.dtype), v).reshape(value.shape)


def local_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                    window: int) -> jnp.ndarray:
    """Each position attends to its ``window x window`` neighbourhood inside the map.

    ``[B,h,w,d], [B,h,w,d], [B,h,w,dv] -> [B,h,w,dv]``; equal to `non_local_attention`
    with logits outside the window masked out, in ``O(hw * window^2)`` memory.
    """
    h, w, d = query.shape[1], query.shape[2], query.shape[3]
    logits = jnp.stack([jnp.sum(query * k, axis=-1) for k in window_shifts(key, window)],
                       axis=-1) / np.sqrt(d)                                # [B,h,w,K]
    a = attention_weights(logits, window_validity(h, w, window)).astype(value.dtype)
    return sum(a[..., i:i + 1] * v for i, v in enumerate(window_shifts(value, window)))


def attention_context(key_query: jnp.ndarray, value: jnp.ndarray, form: str,
                      window: int | None = None) -> jnp.ndarray:
    """The context map ``[B, h, w, dv]`` of ``key_query [B,h,w,2d]`` and ``value [B,h,w,dv]``.

    ``form``: 'pointwise' (`local_attention` over ``window``), 'pooled' (the one
    `pooled_attention` vector of each image, at every position) or 'non_local'
    (`non_local_attention`).
    """
    key, query = split_key_query(key_query)
    if form == "pointwise":
        return local_attention(query, key, value, window)
    if form == "pooled":
        context = pooled_attention(query, key, value)[1]
        return jnp.broadcast_to(context[:, None, None, :], value.shape)
    if form == "non_local":
        return non_local_attention(query, key, value)
    raise ValueError(f"the self-attention form must be 'pointwise' or one of "
                     f"{GLOBAL_ATTENTIONS}, got {form!r}")


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


class KeyQueryValue(nn.Module):
    """The key-query linear layer and the value linear layer (1x1 convs with bias).

    ``x [B, h, w, C] -> (key_query [B, h, w, 2 * key_channels],
    value [B, h, w, value_channels])``; `split_key_query` gives key and query.
    """
    key_channels: int
    value_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        key_query = layers.conv(2 * self.key_channels, 1, use_bias=True, dtype=self.dtype,
                                name="key_query")(x)
        value = layers.conv(self.value_channels, 1, use_bias=True, dtype=self.dtype,
                            name="value")(x)
        return key_query, value


class VectorMapping(nn.Module):
    """``concat(key_query, context)`` -> dense -> ReLU -> 1x1 conv -> BN -> ReLU.

    ``key_query [B, h, w, Ck], context [B, h, w, Cv] -> [B, h, w, features]``: the
    fully connected layer and the 1x1 convolution act on each position's vector; the
    ReLU between them keeps the two from collapsing into one linear map.

    Where: once, in the hybrid head's attention-mean-pool layer, on that layer's
    key-query vectors and the image's pooled context. Why there: it is the one layer
    that has a global vector to map back onto the positions; the key and query layers
    are local by design, and adding the mapped vector to their output hands the global
    information to every layer after it (gated pooling, classifier).
    """
    hidden: int
    features: int
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    fold_bn: bool = True

    @nn.compact
    def __call__(self, key_query: jnp.ndarray, context: jnp.ndarray, *,
                 train: bool) -> jnp.ndarray:
        x = jnp.concatenate([key_query, context.astype(key_query.dtype)], axis=-1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="dense")(x))
        x = layers.conv_bn(x, self.features, 1, train=train, bn_mode=self.bn_mode,
                           axis_name=self.bn_axis_name, fold=self.fold_bn, conv_name="conv",
                           bn_name="bn", dtype=self.dtype)
        return nn.relu(x)


class GatedPooling(nn.Module):
    """Gates the intensity of ``x [B, h, w, C]``: ``x * g``, ``g [B, h, w, C]`` in (0, 1).

    ``g = sigmoid(conv1x1(concat(local mean, local variance, global mean, global
    variance)))`` of ``x``'s channels (`pooling_statistics`, ``4C`` inputs).
    """
    window: int = 7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stats = jnp.concatenate(pooling_statistics(x, self.window), axis=-1)
        gate = nn.sigmoid(layers.conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype,
                                      name="gate")(stats.astype(self.dtype)))
        return x * gate.astype(x.dtype)


class GSAGHead(nn.Module):
    """GSAG segmentation head (the module docstring maps it to the write-up).

    ``features [B, h, w, Cin] -> {'logits': [B, h, w, num_classes],
    'features': [B, h, w, channels * width]}``; ``features`` is what the classifier
    reads (before the optional dropout).

    Attributes:
      num_classes: classifier outputs.
      variant: 'basic' | 'incremental' | 'hybrid'.
      channels: width of the group before the ``width`` multiplier (512).
      width: channel multiplier (tests: tiny).
      window: odd side of the pointwise-attention and local-pooling window.
      global_attention: 'pooled' (one context vector per image, the write-up) |
        'non_local' (a context per position).
      dropout: rate of the dropout before the classifier (0 = none; needs a 'dropout'
        rng when training).
      bn_mode, bn_axis_name: see `layers.batch_norm`.
      fold_bn: fold the batch norms into their convolutions where exact
        (`layers.conv_bn`).
    """
    num_classes: int
    variant: str = "hybrid"
    channels: int = 512
    width: float = 1.0
    window: int = 7
    global_attention: str = "pooled"
    dropout: float = 0.0
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    fold_bn: bool = True

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> dict:
        config_lib.check_choice("model.gsag_variant", self.variant)
        config_lib.check_choice("model.gsag_global_attention", self.global_attention)
        _check_window(self.window)
        c = max(1, int(self.channels * self.width))
        key_channels, value_channels = max(1, c // 8), max(1, c // 2)

        # Key layer: conv3x3-BN-ReLU, then (when a query layer reads them) key, query
        # and value from its key-query and value linear layers.
        x = layers.conv_bn(features, c, 3, train=train, bn_mode=self.bn_mode,
                           axis_name=self.bn_axis_name, fold=self.fold_bn,
                           conv_name="key_conv", bn_name="bn_key", dtype=self.dtype)
        x = nn.relu(x)

        # Query layer: pointwise (windowed) self-attention, added back to the map; the
        # zero-initialised projection makes a new incremental head start as the basic one.
        if self.variant in ("incremental", "hybrid"):
            key_query, value = KeyQueryValue(key_channels, value_channels, dtype=self.dtype,
                                             name="key_qkv")(x)
            context = attention_context(key_query, value, "pointwise", self.window)
            x = x + layers.conv(c, 1, use_bias=True, dtype=self.dtype,
                                kernel_init=nn.initializers.zeros,
                                name="pointwise_proj")(context)

        # Attention-mean-pool layer: the global context vector, mapped back onto every
        # position, added; then gated pooling scales the intensity of the result.
        if self.variant == "hybrid":
            key_query, value = KeyQueryValue(key_channels, value_channels, dtype=self.dtype,
                                             name="global_qkv")(x)
            context = attention_context(key_query, value, self.global_attention)
            x = x + VectorMapping(c, c, bn_mode=self.bn_mode, bn_axis_name=self.bn_axis_name,
                                  dtype=self.dtype, fold_bn=self.fold_bn,
                                  name="vector_mapping")(key_query, context, train=train)
            x = GatedPooling(self.window, dtype=self.dtype, name="gated_pooling")(x)

        penultimate = x
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                             kernel_init=classifier_init, name="classifier")(x)
        return {"logits": logits, "features": penultimate}
