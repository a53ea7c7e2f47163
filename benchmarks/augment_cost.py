"""What the device augmentation costs a TPU, by XLA's count: `augment.augment_batch`
compiled for one chip of a topology (no TPU needed, as the pre-flight does), at a few
batch sizes, one JSON line each with XLA's bytes accessed and FLOPs.

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python -m benchmarks.augment_cost \\
        --topology=v5e:2x2 --canvas=513 --crop=321 --batches=2,4,8,16

The canvas and crop default to the VOC recipes' (`data.eval_size` 513, the canvas, and 321²
crops); the figures are compiler counts for the chip, not measurements.
"""

import argparse
import json
import subprocess

import jax
import jax.numpy as jnp


def cost(topology: str, batch: int, canvas: int, crop: int) -> dict:
    """XLA's cost of augmenting ``batch`` canvases on one chip of ``topology``."""
    from scaleattn import augment, preflight  # pylint: disable=import-outside-toplevel
    sharding = jax.sharding.SingleDeviceSharding(preflight.topology_devices(topology)[0])

    def step(batch_arrays, key_data):
        keys = jax.vmap(lambda k: jax.random.wrap_key_data(k, impl="threefry2x32"))(key_data)
        return augment.augment_batch(batch_arrays, keys, crop_size=crop, scale_range=(0.5, 1.5),
                                     flip=True, mean=(122.7, 116.7, 104.0), std=(1.0, 1.0, 1.0),
                                     ignore_label=255)

    shapes = ({"image": jax.ShapeDtypeStruct((batch, canvas, canvas, 3), jnp.uint8,
                                             sharding=sharding),
               "label": jax.ShapeDtypeStruct((batch, canvas, canvas), jnp.uint8, sharding=sharding),
               "size": jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=sharding)},
              jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=sharding))
    analysis = jax.jit(step).lower(*shapes).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"topology": topology, "batch": batch, "canvas": canvas, "crop": crop,
            "bytes_accessed": analysis["bytes accessed"], "flops": analysis["flops"],
            "in_out_bytes": batch * (canvas * canvas * 4 + crop * crop * (3 * 4 + 4))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--canvas", type=int, default=513)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batches", default="2,4,8,16")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    for batch in (int(b) for b in args.batches.split(",")):
        row = cost(args.topology, batch, args.canvas, args.crop)
        print(json.dumps({**row, "commit": commit, "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
    main()
