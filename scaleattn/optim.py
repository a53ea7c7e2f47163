"""The optimiser of the paper, built from optax parts.

SGD with momentum 0.9 and L2 weight decay added to the gradient of the *kernels*
(Caffe's ``weight_decay``; biases and batch-norm parameters are not decayed), a step
or poly learning-rate schedule, and a learning-rate multiplier (10x) for the layers
that start from scratch rather than from ImageNet weights: they are found by name,
any parameter whose path matches one of ``new_layer_patterns`` (regular expressions;
the defaults name fc8, the ASPP and GSAG heads and the attention head). Convolution and
dense biases get a further ``bias_lr_mult`` (Caffe's DeepLab prototxts: ``lr_mult: 2``
on every bias, so a new layer's bias learns at 20x); batch-norm offsets are not biases
in that sense and keep their layer's rate. With ``bn_mode == 'frozen'`` the batch-norm
scales and offsets get no update.

Caffe scales the decayed gradient by the layer's learning rate before the momentum
(``v = m v + lr (g + wd w)``); optax's ``sgd`` applies the rate after the momentum
(``v = m v + g + wd w; step = lr v``). The two agree while the rate is constant and
differ only in the few steps after a rate change.
"""

import re

import flax
import jax
import ml_collections
import optax

from scaleattn import config as config_lib


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Base learning rate as a function of the step (before layer multipliers)."""
    if cfg.schedule == "step":  # Caffe's 'step': base_lr * factor ** floor(step / size)
        return optax.exponential_decay(cfg.base_lr, transition_steps=int(cfg.step_size),
                                       decay_rate=cfg.step_factor, staircase=True)
    if cfg.schedule == "poly":
        return optax.polynomial_schedule(cfg.base_lr, 0.0, cfg.poly_power,
                                         transition_steps=max(1, total_steps))
    config_lib.check_choice("optim.schedule", cfg.schedule)
    return optax.constant_schedule(cfg.base_lr)


def param_path(path) -> str:
    """'a/b/kernel' for a flattened-dict key tuple."""
    return "/".join(str(p) for p in path)


def is_batch_norm(path: str) -> bool:
    """Batch-norm parameters live in modules named ``bn*`` (see `models.layers`)."""
    return any(part.startswith("bn") for part in path.split("/")[:-1])


def is_bias(path: str) -> bool:
    """A convolution / dense bias (not a batch-norm offset)."""
    return path.split("/")[-1] == "bias" and not is_batch_norm(path)


def param_groups(params, patterns, bn_frozen: bool):
    """Labels every parameter with its learning-rate group (a pytree like ``params``).

    Groups: 'frozen' (batch norm when ``bn_frozen``), else '<origin>_<kind>' with origin
    'new' (path matches one of ``patterns``) or 'pretrained', and kind 'bias' (`is_bias`)
    or 'weight'.
    """
    compiled = [re.compile(p) for p in patterns]

    def label(path: str) -> str:
        if bn_frozen and is_batch_norm(path):
            return "frozen"
        origin = "new" if any(p.search(path) for p in compiled) else "pretrained"
        return f"{origin}_{'bias' if is_bias(path) else 'weight'}"

    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return flax.traverse_util.unflatten_dict({k: label(param_path(k)) for k in flat})


def stop_frozen_gradients(params):
    """``params`` with the 'frozen' group of `param_groups` (``bn_frozen=True``: the
    batch-norm parameters) behind `jax.lax.stop_gradient`.

    For ``bn_mode == 'frozen'``, where that group gets no update: the backward pass
    then computes no gradient that nobody applies, and the gradient (and the logged
    ``grad_norm``) is that of the parameters that train.
    """
    groups = param_groups(params, (), bn_frozen=True)
    return jax.tree_util.tree_map(
        lambda value, group: jax.lax.stop_gradient(value) if group == "frozen" else value,
        params, groups)


def group_lr_multipliers(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """The learning-rate multiplier of each group of `param_groups`."""
    return {"pretrained_weight": 1.0, "pretrained_bias": cfg.bias_lr_mult,
            "new_weight": cfg.new_layer_lr_mult,
            "new_bias": cfg.new_layer_lr_mult * cfg.bias_lr_mult, "frozen": 0.0}


def decay_mask(params):
    """True for convolution / dense kernels, the parameters that get weight decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                     bn_frozen: bool) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser for ``config.optim`` and its base schedule (for logging)."""
    schedule = learning_rate_schedule(cfg, total_steps)

    def sgd(multiplier: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(lambda step: schedule(step) * multiplier, momentum=cfg.momentum))

    transforms = {group: sgd(multiplier) if multiplier else optax.set_to_zero()
                  for group, multiplier in group_lr_multipliers(cfg).items()}
    labels = lambda params: param_groups(params, tuple(cfg.new_layer_patterns), bn_frozen)
    return optax.multi_transform(transforms, labels), schedule
