"""Model zoo: `build_model(config.model)` turns a config into a Flax module.

Every model is a `MultiScaleSegmenter` (a single-scale model is the one-scale case)
around a `SegmentationNet` = backbone + head, so the same code serves the paper's
baselines, its merges and the GSAG heads.
"""

import functools

import jax.numpy as jnp
import ml_collections

from scaleattn import config as config_lib
from scaleattn.models import heads, layers, scale_attention, vgg


def compute_dtype(name: str):
    """'float32' | 'bfloat16' -> the jnp dtype."""
    config_lib.check_choice("model.dtype", name)
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def dilated_conv_impl(cfg: ml_collections.ConfigDict) -> str:
    """The concrete lowering of ``cfg.dilated_conv`` on this platform ('auto' resolved
    by `layers.resolve_dilated_conv`)."""
    return layers.resolve_dilated_conv(cfg.dilated_conv)


def fold_bn(cfg: ml_collections.ConfigDict) -> bool:
    """``cfg.fold_frozen_bn`` (True where a config predates the key)."""
    return bool(cfg.get("fold_frozen_bn", True))


def backbone_factory(cfg: ml_collections.ConfigDict, bn_axis_name: str | None, dtype):
    """A factory ``(name=...) -> backbone module`` for ``cfg.backbone``."""
    config_lib.check_choice("model.backbone", cfg.backbone)
    if cfg.backbone == "vgg16":
        return functools.partial(vgg.VGG16, width=cfg.width, depth=tuple(cfg.depth),
                                 output_stride=cfg.output_stride, dtype=dtype,
                                 dilated_conv=dilated_conv_impl(cfg),
                                 batch_norm=bool(cfg.get("vgg_batch_norm", False)),
                                 bn_mode=cfg.bn_mode, bn_axis_name=bn_axis_name,
                                 fold_bn=fold_bn(cfg))
    from scaleattn.models import resnet  # pylint: disable=import-outside-toplevel
    return functools.partial(
        resnet.resnet, cfg.backbone, width=cfg.width, depth=tuple(cfg.depth),
        output_stride=cfg.output_stride, multi_grid=tuple(cfg.multi_grid),
        stride_in_1x1=cfg.stride_in_1x1, bn_mode=cfg.bn_mode,
        bn_axis_name=bn_axis_name, dtype=dtype, dilated_conv=dilated_conv_impl(cfg),
        fold_bn=fold_bn(cfg), remat=cfg.remat)


def head_factory(cfg: ml_collections.ConfigDict, bn_axis_name: str | None, dtype):
    """A factory ``(name=...) -> head module`` for ``cfg.head``."""
    config_lib.check_choice("model.head", cfg.head)
    if cfg.head == "largefov":
        return functools.partial(heads.LargeFOVHead, cfg.num_classes, fc_width=cfg.fc_width,
                                 fc6_dilation=cfg.fc6_dilation, dropout=cfg.dropout,
                                 width=cfg.width, dtype=dtype,
                                 dilated_conv=dilated_conv_impl(cfg))
    if cfg.head == "aspp_v2":
        return functools.partial(heads.ASPPv2Head, cfg.num_classes,
                                 rates=tuple(cfg.aspp_rates), dtype=dtype,
                                 dilated_conv=dilated_conv_impl(cfg))
    from scaleattn.models import self_attention  # pylint: disable=import-outside-toplevel
    return functools.partial(self_attention.GSAGHead, num_classes=cfg.num_classes,
                             variant=cfg.gsag_variant, channels=cfg.gsag_channels,
                             width=cfg.width, window=cfg.gsag_window,
                             global_attention=cfg.gsag_global_attention,
                             dropout=cfg.gsag_dropout, bn_mode=cfg.bn_mode,
                             bn_axis_name=bn_axis_name, dtype=dtype,
                             fold_bn=fold_bn(cfg))


def build_model(cfg: ml_collections.ConfigDict, *, bn_axis_name: str | None = None):
    """Builds the model described by ``config.model``.

    Args:
      cfg: the ``model`` section of a config (see `scaleattn.config`).
      bn_axis_name: the pmap axis over which trained batch norm synchronises its
        statistics (``None`` under plain/sharded `jit`, where batches are global).

    ``cfg.dilated_conv='auto'`` is resolved here, for the platform this process runs
    on (`layers.resolve_dilated_conv`): the modules hold a concrete lowering.

    Returns:
      A `MultiScaleSegmenter`; ``model.apply(variables, images, train=...)`` gives
      ``{'logits', 'scale_logits', 'branch_logits', 'attention'?}``.
    """
    dtype = compute_dtype(cfg.dtype)
    axis = bn_axis_name if cfg.sync_bn else None
    net = scale_attention.SegmentationNet(
        backbone=backbone_factory(cfg, axis, dtype), head=head_factory(cfg, axis, dtype),
        head_name=cfg.head)
    return scale_attention.MultiScaleSegmenter(
        net=net, scales=tuple(cfg.scales), merge=cfg.merge,
        attention_hidden=max(1, int(cfg.attention_width * cfg.width)),
        attention_dropout=cfg.attention_dropout,
        alpha_hidden=max(1, int(cfg.alpha_width * cfg.width)),
        inference_scales=tuple(cfg.inference_scales), bn_mode=cfg.bn_mode,
        bn_axis_name=axis, dtype=dtype, fold_bn=fold_bn(cfg))
