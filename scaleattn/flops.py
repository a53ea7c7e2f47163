"""Model FLOPs: the multiply-adds a model's convolutions and matrix products need.

XLA's cost analysis (`bench.compiled_flops`) counts what a compiled step executes:
a dilated convolution lowered as space-to-batch is counted over its padded
sub-images, one lowered with 'taps' without the taps that only read padding, and a
kernel a backend zero-pads to ``(d (k - 1) + 1)²`` taps with all of them. The count
here is of the model instead, the same for every lowering and backend:

* a convolution costs ``2 * (output elements) * (Cin / groups) * kh * kw``: every
  output value is a sum over its ``kh * kw`` taps (a dilated kernel has no more taps
  than an undilated one) of ``Cin / groups`` products, all counted, those at the
  border that read padding included;
* a matrix product (``dot_general``: dense layers, 1x1 convolutions written as
  products, attention, the interpolation matrices of `layers.resize_bilinear`) costs
  ``2 * (output elements) * (size of the contracted dimensions)``;
* nothing else counts (element-wise ops, reductions, softmax, batch norm).

The model's forward pass is traced (`jax.make_jaxpr`, no compilation, nothing runs)
and its equations are walked, into nested jaxprs (``pjit``, ``custom_jvp_call``,
``remat`` ...), a ``scan`` body counted ``length`` times, one branch of a ``cond``
(the largest). `model_flops` traces the model with its dilated convolutions as
XLA's ``native`` dilated convolution (the model's own arithmetic; the other
lowerings are exact rewrites of it). A train step is counted as three forward
passes (forward, and twice its FLOPs for the backward pass: the gradients with
respect to the activations and to the weights); eval as one.
"""

import copy
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jax_core

TRAIN_STEP_FORWARDS = 3  # forward + backward (gradients of activations and of weights)


def conv_flops(eqn) -> int:
    """FLOPs of one ``conv_general_dilated`` equation: ``2 * out.size * (Cin / groups)
    * prod(kernel spatial dims)`` (the kernel's input-feature dimension already holds
    ``Cin / feature_group_count``; its dilation adds no taps)."""
    rhs_shape = eqn.invars[1].aval.shape
    out_size = math.prod(eqn.outvars[0].aval.shape)
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
    taps = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    return 2 * out_size * rhs_shape[rhs_spec[1]] * taps


def dot_flops(eqn) -> int:
    """FLOPs of one ``dot_general`` equation: ``2 * out.size * prod(contracted dims)``."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_size = math.prod(eqn.outvars[0].aval.shape)
    return 2 * out_size * math.prod(lhs_shape[d] for d in lhs_contract)


def _inner(value):
    """The `jax.core.Jaxpr` of a parameter that is a jaxpr or closed jaxpr, else None."""
    if isinstance(value, jax_core.ClosedJaxpr):
        return value.jaxpr
    if isinstance(value, jax_core.Jaxpr):
        return value
    return None


def jaxpr_flops(jaxpr) -> int:
    """FLOPs (module docstring) of a `jax.core.Jaxpr` or `ClosedJaxpr`, nested ones
    included. Raises ``ValueError`` for a ``while`` loop whose body has any (its trip
    count is not known when tracing)."""
    jaxpr = _inner(jaxpr) or jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += conv_flops(eqn)
        elif name == "dot_general":
            total += dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        elif name == "while":
            inner = jaxpr_flops(eqn.params["body_jaxpr"]) + jaxpr_flops(
                eqn.params["cond_jaxpr"])
            if inner:
                raise ValueError("a while loop with convolutions or matrix products: its "
                                 "trip count is unknown, its FLOPs cannot be counted")
        else:
            for value in eqn.params.values():
                if _inner(value) is not None:
                    total += jaxpr_flops(value)
    return total


def function_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call of ``fn(*args, **kwargs)``; arrays or `jax.ShapeDtypeStruct`s
    (only shapes and dtypes are used, nothing runs)."""
    return jaxpr_flops(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args))


def forward_flops(model, image_shape, *, train: bool = False) -> int:
    """FLOPs of ``model.apply(variables, images, train=train)`` for images of
    ``image_shape`` ``[B, H, W, 3]``, as ``model`` computes it (its dilated
    convolutions as it lowers them: see `model_flops` for the model's own count)."""
    images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    variables = jax.eval_shape(functools.partial(model.init, train=False), rngs, images)

    def forward(variables, images):
        out, _ = model.apply(variables, images, train=train, rngs={"dropout": rngs["dropout"]},
                             mutable=["batch_stats"])
        return out

    return function_flops(forward, variables, images)


def model_flops(model_cfg: ml_collections.ConfigDict, image_shape, *,
                train: bool = False) -> int:
    """The model FLOPs of one forward pass of ``build_model(model_cfg)`` on images of
    ``image_shape`` ``[B, H, W, 3]`` (``train`` picks the train-time scales and
    layers): the model traced with ``dilated_conv='native'``, so one number for every
    lowering (and the same with or without batch-norm folding or remat)."""
    from scaleattn import models  # pylint: disable=import-outside-toplevel
    cfg = copy.deepcopy(model_cfg)
    cfg.dilated_conv = "native"
    return forward_flops(models.build_model(cfg), image_shape, train=train)


def step_flops(model_cfg: ml_collections.ConfigDict, batch_size: int, size: int) -> dict:
    """``{'train': ..., 'eval': ..., 'forward': ...}`` model FLOPs of one step on a
    batch of ``batch_size`` ``size x size`` images: ``train`` is `TRAIN_STEP_FORWARDS`
    times the train-mode forward (``forward``), ``eval`` one inference forward."""
    shape = (batch_size, size, size, 3)
    forward = model_flops(model_cfg, shape, train=True)
    return {"forward": forward, "train": TRAIN_STEP_FORWARDS * forward,
            "eval": model_flops(model_cfg, shape, train=False)}
