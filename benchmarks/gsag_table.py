"""Parameters and forward FLOPs of the full-size GSAG configs, as a table.

    python -m benchmarks.gsag_table [--size=513] [--variants=basic,incremental,hybrid]

One row per shipped ``configs/gsag.py:<variant>,<backbone>``, inference forward pass of
one ``size x size`` image, no device time, no TensorFlow. Two FLOP counts, 2 per
multiply-add: the model's (`scaleattn.flops.model_flops`: convolutions at their true
taps and matrix products, the count MFU uses) and XLA's cost analysis of the lowered
(not compiled) pass, which also counts element-wise work. Parameters exclude
batch-norm statistics.
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from scaleattn import config as config_lib
from scaleattn import flops
from scaleattn.models import build_model

BACKBONES = ("r50", "r101", "x101")


def model_cost(config, size: int) -> tuple[int, int, float]:
    """``(parameters, model FLOPs, XLA's FLOPs)`` of the inference forward pass of
    ``config.model`` on one ``size``-square image."""
    model = build_model(config.model)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               jax.random.PRNGKey(0), image)
    params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, image)
    return (params, flops.model_flops(config.model, image.shape),
            float(lowered.cost_analysis()["flops"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--variants", default="basic,incremental,hybrid")
    args = parser.parse_args()
    print(f"| config | backbone | params (M) | model GFLOPs @ {args.size}x{args.size} | "
          "XLA GFLOPs |")
    print("|---|---|---|---|---|")
    for backbone in BACKBONES:
        for variant in config_lib.comma_list(args.variants):
            config = config_lib.recipe(f"gsag:{variant},{backbone}")
            params, model_flops, xla_flops = model_cost(config, args.size)
            print(f"| {config.name} | {config.model.backbone} | {params / 1e6:.2f} | "
                  f"{model_flops / 1e9:.1f} | {xla_flops / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
