"""Gated Self-Attention Group (GSAG) segmentation heads.

The GSAG write-up (a Chinese blog post) lists its pieces in §3.2 ("innovations") but
gives neither their wiring nor their sizes. The table below takes §3.2 sentence by
sentence (row numbers follow its five parts; 0.x is its introduction), names the code
that implements each sentence, and says where the code had to choose. ``x`` is a
feature map ``[B, h, w, C]`` with ``C = channels * width`` (512 at full size); key
and query have ``dk = C / 8`` channels, values ``dv = C / 2``.

| #   | The write-up says (in English) | Code                       | Where the code chose         |
|-----|--------------------------------|----------------------------|------------------------------|
| 0.1 | The authors propose a network  | `GSAGHead` (a segmentation | A head on the last backbone  |
|     | that integrates group          | head on a dilated ResNet / | stage; 'group' is read as    |
|     | attention: the Gated           | ResNeXt)                   | the group of layers below,   |
|     | Self-Attention Group (GSAG).   |                            | not as channel groups.       |
|     |                                |                            |                              |
| 0.2 | GSAG captures global features  | the whole model trains end | 'Different layers' is read   |
|     | of different layers and can be | to end                     | as the group's own three     |
|     | fine-tuned end to end,         | (`steps.train_step`);      | layers; the head reads one   |
|     | extracting both global and     | backbone from ImageNet     | backbone stage, not several. |
|     | local information.             | (`model.init_from`)        |                              |
|     |                                |                            |                              |
| 0.3 | The network is made of a       | `pooled_attention`,        | The first four are the parts |
|     | global self-attention          | `VectorMapping`,           | the three layers are built   |
|     | mechanism, a vector mapping, a | `local_attention`,         | from (rows 5.x).             |
|     | pointwise self-attention       | `GatedPooling`, and the    |                              |
|     | mechanism, a gated pooling     | three layers of `GSAGHead` |                              |
|     | layer and three convolution    |                            |                              |
|     | layers.                        |                            |                              |
|     |                                |                            |                              |
| 1.1 | Global self-attention extracts | `attention_context(...,    | -                            |
|     | global information from the    | 'pooled')` in the          |                              |
|     | convolutional feature map.     | attention-mean-pool layer  |                              |
|     |                                |                            |                              |
| 1.2 | It is built from two linear    | `KeyQueryValue` (two 1x1   | A linear layer on a feature  |
|     | layers.                        | convs with bias)           | map = a 1x1 convolution,     |
|     |                                |                            | applied at every position.   |
|     |                                |                            |                              |
| 1.3 | The first, the key-query       | `KeyQueryValue.key_query`  | One conv whose output is     |
|     | linear layer, reads the        | (2 dk outputs), split by   | split in halves (key first); |
|     | previous layer's feature map   | `split_key_query`          | dk = C / 8.                  |
|     | and produces key vectors and   |                            |                              |
|     | query vectors.                 |                            |                              |
|     |                                |                            |                              |
| 1.4 | The second, the value linear   | `KeyQueryValue.value` (dv  | dv = C / 2 (the write-up     |
|     | layer, reads the same map and  | = C / 2 outputs)           | gives no widths).            |
|     | produces value vectors.        |                            |                              |
|     |                                |                            |                              |
| 1.5 | The key-query layer learns a   | `pooled_attention`: weight | One query per image, qbar =  |
|     | semantic representation, so    | a_j = softmax_j(qbar . k_j | the mean of the per-position |
|     | that pixels at different       | / sqrt(dk))                | queries, scores every key    |
|     | positions take different       |                            | (scaled dot product, softmax |
|     | meanings from their context.   |                            | over all h*w positions,      |
|     |                                |                            | float32). Alternative not    |
|     |                                |                            | taken: the mean over i of    |
|     |                                |                            | the non-local softmax_j(q_i  |
|     |                                |                            | . k_j), quadratic in h*w.    |
|     |                                |                            |                              |
| 1.6 | The value layer compresses the | `pooled_attention`:        | The weights are the          |
|     | values of all pixels into one  | context = sum_j a_j v_j,   | attention weights of 1.5, so |
|     | vector, instead of one         | one [dv] vector per image  | the vector is their weighted |
|     | encoding per position.         |                            | mean of the values. The      |
|     |                                |                            | non-local form (a context    |
|     |                                |                            | per position) is kept as the |
|     |                                |                            | option global_attention =    |
|     |                                |                            | 'non_local', not the         |
|     |                                |                            | default.                     |
|     |                                |                            |                              |
| 1.7 | So the value layer is the      | the pooled vector is the   | -                            |
|     | important tool for extracting  | only input of the head     |                              |
|     | global information.            | that sees the whole image  |                              |
|     |                                |                            |                              |
| 2.1 | Every convolution layer can    | `VectorMapping`, applied   | Applied where a global       |
|     | learn global information       | once: in the               | vector exists. The key layer |
|     | through a vector mapping       | attention-mean-pool layer  | (3x3 conv) and the query     |
|     | layer.                         | (hybrid)                   | layer (windowed attention)   |
|     |                                |                            | stay local by design (4.x:   |
|     |                                |                            | pointwise attention only     |
|     |                                |                            | looks at each pixel's        |
|     |                                |                            | neighbourhood); the mapped   |
|     |                                |                            | vector is added to the map   |
|     |                                |                            | they produce, so from there  |
|     |                                |                            | on every layer (gated        |
|     |                                |                            | pooling, classifier) sees    |
|     |                                |                            | it.                          |
|     |                                |                            |                              |
| 2.2 | The key-query vector and the   | `VectorMapping.dense` on   | Key-query vector: the global |
|     | value vector are concatenated  | concat(key_query_i,        | layer's key-query output at  |
|     | and fed to a fully connected   | context)                   | position i (2 dk); value     |
|     | layer.                         |                            | vector: the image's pooled   |
|     |                                |                            | context (dv). Position i's   |
|     |                                |                            | key-query vector is what     |
|     |                                |                            | maps the one context back    |
|     |                                |                            | onto every position          |
|     |                                |                            | differently.                 |
|     |                                |                            |                              |
| 2.3 | It is then transformed by a    | `VectorMapping`: dense ->  | A ReLU after each of the two |
|     | 1x1 convolution, followed by a | ReLU -> `conv` (1x1) -> BN | linear maps: with only the   |
|     | nonlinear activation.          | -> ReLU                    | last one the dense layer and |
|     |                                |                            | the 1x1 conv would be a      |
|     |                                |                            | single linear map. The BN is |
|     |                                |                            | the heads' usual             |
|     |                                |                            | conv-BN-ReLU.                |
|     |                                |                            |                              |
| 2.4 | In this way the convolution    | attention-mean-pool layer: | Added to the query layer's   |
|     | layer obtains a new            | x3 = x2 +                  | output x2 (residual), so the |
|     | representation vector.         | VectorMapping(...)         | local features are kept.     |
|     |                                |                            |                              |
| 3.1 | Pointwise self-attention       | `attention_context(...,    | 'Pointwise' = each pixel     |
|     | extracts local information at  | 'pointwise', window)` =    | attends to a window x window |
|     | every position of the feature  | `local_attention`          | neighbourhood (7; demo 5)    |
|     | map.                           |                            | around it; positions outside |
|     |                                |                            | the map are left out, not    |
|     |                                |                            | zero-padded.                 |
|     |                                |                            |                              |
| 3.2 | It is built from two linear    | `KeyQueryValue` named      | The same module as 1.2; the  |
|     | layers: a key-query layer      | `key_qkv` (part of the key | pointwise attention reads    |
|     | producing keys and queries,    | layer, 5.2)                | the key layer's key, query   |
|     | and a value layer producing    |                            | and value.                   |
|     | values.                        |                            |                              |
|     |                                |                            |                              |
| 3.3 | Like the global mechanism it   | `local_attention`: c_i =   | A context per position (not  |
|     | encodes the input features;    | sum_{j in window(i)}       | pooled): the same            |
|     | unlike it, it only attends to  | softmax_j(q_i . k_j /      | key-query-value form,        |
|     | each pixel's context, and so   | sqrt(dk)) v_j              | restricted to the window.    |
|     | gathers more local             |                            |                              |
|     | information.                   |                            |                              |
|     |                                |                            |                              |
| 4.1 | Gated pooling is an effective  | `GatedPooling` (hybrid),   | -                            |
|     | way to merge local and global  | on the sum of local        |                              |
|     | information.                   | features and mapped global |                              |
|     |                                | vector                     |                              |
|     |                                |                            |                              |
| 4.2 | It is built from two layers.   | `pooling_statistics` (no   | The first 'layer' is         |
|     |                                | weights), then             | parameter-free pooling; the  |
|     |                                | `GatedPooling.gate`        | second is a 1x1 conv with    |
|     |                                |                            | bias + sigmoid.              |
|     |                                |                            |                              |
| 4.3 | The first takes a set of       | `pooling_statistics`: per  | Same window as the pointwise |
|     | feature maps and produces      | channel, over a window x   | attention; biased variances; |
|     | local and global means and     | window neighbourhood       | float32.                     |
|     | variances.                     | (local) and over the whole |                              |
|     |                                | image (global)             |                              |
|     |                                |                            |                              |
| 4.4 | The second, a gating           | `GatedPooling`: x *        | The gate scales the          |
|     | mechanism, uses the learnt     | sigmoid(conv1x1(concat(4   | intensity (features x gate), |
|     | means and variances to adjust  | statistics)))              | per position and channel; no |
|     | the intensity of the feature   |                            | mix with another path.       |
|     | maps, selecting the important  |                            |                              |
|     | features.                      |                            |                              |
|     |                                |                            |                              |
| 5.1 | The three convolution layers   | `GSAGHead.__call__`: key   | Variants (write-up's         |
|     | are GSAG's core; they carry    | layer -> query layer ->    | experiments): basic = key    |
|     | the extraction of global and   | attention-mean-pool layer  | layer; incremental = + query |
|     | local information.             | -> classifier              | layer; hybrid = +            |
|     |                                |                            | attention-mean-pool layer    |
|     |                                |                            | (the 'gated' module).        |
|     |                                |                            |                              |
| 5.2 | The first, the key layer,      | key layer: x1 =            | The key-query-value          |
|     | reads the previous output and  | ReLU(BN(conv3x3(x))); key, | projections are made when a  |
|     | obtains a new feature map in   | query, value =             | later layer reads them       |
|     | key-query-value form.          | `key_qkv`(x1)              | (incremental, hybrid); the   |
|     |                                |                            | basic head is                |
|     |                                |                            | conv3x3-BN-ReLU +            |
|     |                                |                            | classifier.                  |
|     |                                |                            |                              |
| 5.3 | The second, the query layer,   | query layer: x2 = x1 +     | Residual update; the 1x1     |
|     | updates the feature map with   | `pointwise_proj`(c), c =   | projection back to C         |
|     | pointwise self-attention.      | local_attention(q, k, v)   | channels is                  |
|     |                                |                            | zero-initialised, so a new   |
|     |                                |                            | incremental head computes    |
|     |                                |                            | what the basic one does.     |
|     |                                |                            |                              |
| 5.4 | The third, the                 | x3 = x2 +                  | 'Weighted sum' = the         |
|     | attention-mean-pooling layer,  | `vector_mapping`(kq,       | attention-weighted mean of   |
|     | makes a new feature map with   | pooled context of          | the values (1.6); the        |
|     | global self-attention and      | `global_qkv`(x2)); output  | layer's output is then gated |
|     | takes a weighted sum to give   | = `gated_pooling`(x3)      | (4.4) and read by the        |
|     | the final output.              |                            | classifier.                  |

The write-up's experiments (§3.4): the three heads ``basic`` / ``incremental`` /
``hybrid`` (`VARIANTS`) on ResNet-50/101 and ResNeXt-101; the hybrid head trained with
OHEM-softmax gives its best result. The ``gsag_hybrid_*`` configs therefore train
with OHEM (`scaleattn.losses.ohem_keep_mask`, on logits upsampled to the label size);
``gsag_basic_*`` and ``gsag_incremental_*`` train with plain softmax cross-entropy,
OHEM being one switch away (``loss.type='ohem'``).

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
