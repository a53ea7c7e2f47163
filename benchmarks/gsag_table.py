"""Parameters and forward FLOPs of the full-size GSAG configs, as a table.

    python -m benchmarks.gsag_table [--size=513] [--variants=basic,incremental,hybrid]

One row per shipped ``configs/gsag_<variant>_<backbone>.py``. FLOPs are XLA's cost
analysis of the lowered (not compiled) inference forward pass of one ``size x size``
image: no device time, no TensorFlow; the counts are the HLO's (2 per multiply-add).
Parameters exclude batch-norm statistics.
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from scaleattn import config as config_lib
from scaleattn.models import build_model

BACKBONES = ("r50", "r101", "x101")


def model_cost(config, size: int) -> tuple[int, float]:
    """``(parameters, forward FLOPs)`` of ``config.model`` on one ``size``-square image."""
    model = build_model(config.model)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               jax.random.PRNGKey(0), image)
    params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, image)
    return params, float(lowered.cost_analysis()["flops"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--variants", default="basic,incremental,hybrid")
    args = parser.parse_args()
    print(f"| config | backbone | params (M) | GFLOPs @ {args.size}x{args.size} |")
    print("|---|---|---|---|")
    for backbone in BACKBONES:
        for variant in config_lib.comma_list(args.variants):
            config = config_lib.recipe(f"gsag_{variant}_{backbone}")
            params, flops = model_cost(config, args.size)
            print(f"| {config.name} | {config.model.backbone} | {params / 1e6:.2f} | "
                  f"{flops / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
