"""Attention to Scale (Chen, Yang, Wang, Xu, Yuille, CVPR 2016).

A share-net: one segmentation network (backbone + head, weights shared) runs on the
image at each scale ``s`` of a list; every branch's score map ``f^s`` is resized
(bilinear) to the size of the scale-1 branch and the maps are merged per pixel:

* ``attention``: ``g_ic = sum_s w^s_i f^s_ic`` with ``w^s_i = softmax_s(h^s_i)``, where
  ``h`` comes from a small head on the concatenated penultimate features of all scales
  (conv3x3 512 -> ReLU -> Dropout 0.5 -> conv1x1 S), shared over the classes;
* ``avg``: the same sum with ``w = 1/S`` (a special case of attention);
* ``max``: ``g_ic = max_s f^s_ic``;
* ``hierarchical`` (Tao, Sapra and Catanzaro 2020, "Hierarchical Multi-Scale
  Attention for Semantic Segmentation"): every branch also predicts a per-pixel weight
  ``alpha^s`` in (0, 1) relative to the next larger scale, and the maps are chained from
  the largest scale down (`hierarchical_merge`). Its parameters do not depend on the
  number of scales, so a model trained on {0.5, 1} runs at inference on any list that
  contains 1 (``inference_scales``).

Reading taken where the write-up is terse: the attention head sees each branch's
penultimate features (fc7 for LargeFOV, the last ResNet stage for ASPP) resized to
the common size. The model returns each branch's score map twice: at the branch's
own size (`branch_logits`, what the paper's extra-supervision losses are computed
on, against the ground truth shrunk to that size) and resized to the common size
(`scale_logits`, what is merged).
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaleattn import config as config_lib
from scaleattn.models import layers

MERGES = config_lib.CHOICES["model.merge"]


def merge_scales(scale_logits: jnp.ndarray, merge: str,
                 weights: jnp.ndarray | None = None) -> jnp.ndarray:
    """Merges per-scale score maps into one.

    Args:
      scale_logits: ``[S, B, h, w, C]`` score maps of the S scales, at one size.
      merge: 'attention' or 'avg' (weighted sum) or 'max' (elementwise maximum).
      weights: ``[B, h, w, S]`` per-pixel weights over scales, used by 'attention'
        (for 'avg' they default to 1/S).

    Returns:
      ``[B, h, w, C]`` merged score map.
    """
    if merge == "max":
        return jnp.max(scale_logits, axis=0)
    if merge == "avg" and weights is None:
        weights = uniform_weights(scale_logits)
    if merge not in ("attention", "avg") or weights is None:
        raise ValueError(f"merge must be one of {MERGES} (attention needs weights), "
                         f"got {merge!r}")
    return jnp.einsum("sbhwc,bhws->bhwc", scale_logits, weights.astype(scale_logits.dtype))


def hierarchical_merge(branch_logits: Sequence[jnp.ndarray], alphas: Sequence[jnp.ndarray],
                       scales: Sequence[float]) -> jnp.ndarray:
    """Chains per-scale score maps from the largest scale down.

    Args:
      branch_logits: S maps ``[B, h_s, w_s, C]``, each at its branch's own size.
      alphas: S maps ``[B, h_s, w_s, 1]`` in (0, 1), at the same sizes.
      scales: the S input scales (must contain 1).

    Returns:
      ``[B, h_1, w_1, C]`` at the scale-1 branch's size: the running prediction starts
      as the largest scale's map; a further scale ``s >= 1`` gives
      ``alpha_s f_s + (1 - alpha_s) resize(pred)`` (pred resized to ``f_s``'s size), a
      scale ``s < 1`` gives ``up(alpha_s f_s) + (1 - up(alpha_s)) pred`` (``up``: bilinear
      to pred's size). The largest scale's alpha is not used.
    """
    order = sorted(range(len(scales)), key=lambda i: -scales[i])
    pred = branch_logits[order[0]]
    for i in order[1:]:
        logits, alpha = branch_logits[i], alphas[i].astype(branch_logits[i].dtype)
        if scales[i] >= 1.0:
            pred = alpha * logits + (1 - alpha) * layers.resize_bilinear(
                pred, logits.shape[1:3])
        else:
            size = pred.shape[1:3]
            pred = (layers.resize_bilinear(alpha * logits, size)
                    + (1 - layers.resize_bilinear(alpha, size)) * pred)
    return pred


def uniform_weights(scale_logits: jnp.ndarray) -> jnp.ndarray:
    """``[B, h, w, S]`` weights of 1/S for ``scale_logits`` of shape ``[S, B, h, w, C]``."""
    s, b, h, w, _ = scale_logits.shape
    return jnp.full((b, h, w, s), 1.0 / s, scale_logits.dtype)


class ScaleAttentionHead(nn.Module):
    """Per-pixel weights over scales: ``[B, h, w, Cin] -> [B, h, w, S]`` (softmax over S)."""
    num_scales: int
    hidden: int = 512
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = layers.conv(self.hidden, 3, use_bias=True, dtype=self.dtype, name="conv1")(features)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        scores = layers.conv(self.num_scales, 1, use_bias=True, dtype=self.dtype,
                             kernel_init=nn.initializers.normal(0.01), name="conv2")(x)
        return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


class ScaleAlphaHead(nn.Module):
    """Hierarchical attention's per-pixel weight of one branch:
    ``[B, h, w, Cin] -> [B, h, w, 1]`` in (0, 1).

    conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> sigmoid, one module
    shared by all branches. The batch norms follow the model's ``bn_mode``: with frozen
    batch norm (the DeepLab recipes) they are fixed identities and the head is
    conv-ReLU-conv-ReLU-conv.
    """
    hidden: int = 256
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    fold_bn: bool = True

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = features
        for i in (1, 2):
            x = layers.conv_bn(x, self.hidden, 3, train=train, bn_mode=self.bn_mode,
                               axis_name=self.bn_axis_name, fold=self.fold_bn,
                               conv_name=f"conv{i}", bn_name=f"bn{i}", dtype=self.dtype)
            x = nn.relu(x)
        scores = layers.conv(1, 1, use_bias=True, dtype=self.dtype,
                             kernel_init=nn.initializers.normal(0.01), name="conv3")(x)
        return jax.nn.sigmoid(scores.astype(jnp.float32))


class SegmentationNet(nn.Module):
    """Backbone followed by a head: ``[B, H, W, 3] -> {'logits', 'features'}``.

    ``backbone`` and ``head`` are module factories (e.g. `functools.partial` of a
    module class) called with ``name=``, so parameter paths read
    ``backbone/...`` and ``<head_name>/...``.
    """
    backbone: Callable[..., nn.Module]
    head: Callable[..., nn.Module]
    head_name: str = "head"

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> dict:
        features = self.backbone(name="backbone")(images, train=train)
        return self.head(name=self.head_name)(features, train=train)


class MultiScaleSegmenter(nn.Module):
    """Runs a shared `SegmentationNet` at several scales and merges the score maps.

    ``images [B, H, W, 3] -> dict`` with
      * ``logits``: ``[B, h, w, C]`` merged scores at the scale-1 branch's size,
      * ``scale_logits``: list of S maps ``[B, h, w, C]`` (each branch, resized),
      * ``branch_logits``: list of S maps ``[B, h_s, w_s, C]`` (each branch at its own
        output size, e.g. 41, 31 and 21 for a 321 crop at scales 1, 0.75, 0.5),
      * ``attention``: ``[B, h, w, S]`` merge weights ('attention' and 'avg'), or each
        branch's alpha resized to the common size ('hierarchical').

    With a single scale the wrapper is the plain network (``logits`` = its output).
    ``train=False`` runs on ``inference_scales`` when given (hierarchical only: the other
    merges' parameters are tied to their scale list).
    """
    net: nn.Module
    scales: Sequence[float] = (1.0, 0.75, 0.5)
    merge: str = "attention"
    attention_hidden: int = 512
    attention_dropout: float = 0.5
    alpha_hidden: int = 256
    inference_scales: Sequence[float] = ()
    bn_mode: str = "frozen"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    fold_bn: bool = True

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> dict:
        scales = tuple(self.scales) if train else tuple(self.inference_scales or self.scales)
        if 1.0 not in scales:
            raise ValueError(f"model.scales must contain 1.0 (the reference size), "
                             f"got {scales}")
        config_lib.check_choice("model.merge", self.merge)
        if scales != tuple(self.scales) and self.merge != "hierarchical":
            raise ValueError(f"only the hierarchical merge runs on scales {scales} it was not "
                             f"trained on ({tuple(self.scales)})")
        size = images.shape[1:3]
        branches = []
        for scale in scales:
            x = images if scale == 1.0 else layers.resize_bilinear(
                images, layers.scaled_size(size, scale))
            branches.append(self.net(x, train=train))
        out_size = branches[scales.index(1.0)]["logits"].shape[1:3]
        branch_logits = [b["logits"] for b in branches]
        scale_logits = [layers.resize_bilinear(b, out_size) for b in branch_logits]
        if len(scales) == 1:
            return {"logits": scale_logits[0], "scale_logits": scale_logits,
                    "branch_logits": branch_logits}

        if self.merge == "hierarchical":
            alpha_head = ScaleAlphaHead(self.alpha_hidden, self.bn_mode, self.bn_axis_name,
                                        dtype=self.dtype, fold_bn=self.fold_bn, name="alpha")
            alphas = [alpha_head(b["features"], train=train) for b in branches]
            return {"logits": hierarchical_merge(branch_logits, alphas, scales),
                    "scale_logits": scale_logits, "branch_logits": branch_logits,
                    "attention": jnp.concatenate(
                        [layers.resize_bilinear(a, out_size) for a in alphas], axis=-1)}
        stacked = jnp.stack(scale_logits)
        if self.merge == "attention":
            features = jnp.concatenate(
                [layers.resize_bilinear(b["features"], out_size) for b in branches], axis=-1)
            weights = ScaleAttentionHead(len(scales), self.attention_hidden,
                                         self.attention_dropout, dtype=self.dtype,
                                         name="attention")(features, train=train)
        elif self.merge == "avg":
            weights = uniform_weights(stacked)
        else:
            weights = None
        out = {"logits": merge_scales(stacked, self.merge, weights),
               "scale_logits": scale_logits, "branch_logits": branch_logits}
        if weights is not None:
            out["attention"] = weights
        return out
