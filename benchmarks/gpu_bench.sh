#!/usr/bin/env bash
# The accelerator measurement (see docs/design.md, "Dilated convolutions on accelerators")
# on a GPU machine that has JAX and PyTorch but neither
# TensorFlow nor ml_collections, and no internet (the lent H100/H200 image):
#
#   # here, once: the one missing pure-Python package, as a wheel
#   pip download ml_collections --no-deps -d .wheels && echo /.wheels/ >> .git/info/exclude
#   # there (device tool: carry .wheels), at most ~10 minutes per call:
#   bash benchmarks/gpu_bench.sh bfloat16 "$OUT"     # then float32 in a second call
#
# Further arguments go to both runs after the script's own (a later --config.* wins);
# PEER_ARGS replaces the peer's flags (default --compile); LOWERINGS (default
# native,space_to_batch,taps) the dilated-conv lowerings of the second run, empty: none;
# PARTS (default compare,lowerings) which of the two runs below to do.
#
# The target setting: ResNet-101-ASPP, 3 scales with attention, crop 321, batch 8 on one
# device, augmentation on the host (the step alone, as the peer is timed), one dtype.
#  1. benchmarks.compare: JAX with the dilated convolutions lowered as model.dilated_conv=
#     'auto' picks for a GPU (layers.DILATED_CONV_AUTO) against the PyTorch peer with
#     torch.compile -> compare.md / compare.json, jax_0.json, torch_0.json. First, so
#     that a time limit leaves the headline ratio.
#  2. --mode=bench with each lowering of the dilated convolutions (LOWERINGS), timed in
#     one process -> lowerings.json, rewritten after every row.
# Each row carries a profile of its train step (the ops that took the time).
set -euo pipefail
dtype="${1:-bfloat16}"
out="${2:-${OUT:-bench_out}}"
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
if ! python3 -c "import ml_collections" 2>/dev/null; then
  if ! ls .wheels/ml_collections-*.whl >/dev/null 2>&1; then
    echo "ml_collections is not installed and .wheels/ has no wheel of it: see the top" \
         "of $0" >&2
    exit 2
  fi
  python3 -m pip install --quiet --no-index --no-deps --target /tmp/scaleattn_site \
    .wheels/ml_collections-*.whl
  export PYTHONPATH="/tmp/scaleattn_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
python3 -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda.*|flax|optax|orbax-checkpoint|torch|triton|numpy) ' \
  > "$out/versions.txt" || true
setting=(--config=configs/voc_r101.py --config.bench.dtypes="$dtype"
         --config.bench.batch_size=8 --config.data.crop_size=321
         --config.data.augment_on=host --config.bench.profile_dir=/tmp/scaleattn_profile
         --config.bench.steps=10 --config.bench.warmup=3)
parts=",${PARTS-compare,lowerings},"
status=0  # the second run goes ahead if the first fails; the script exits with the failure
if [[ "$parts" == *,compare,* ]]; then
  python3 -m benchmarks.compare "${setting[@]}" --config.bench.dilated_convs=auto \
    --peer_args="${PEER_ARGS---compile}" --output_dir="$out" "$@" || status=$?
fi
lowerings="${LOWERINGS-native,space_to_batch,taps}"
if [[ -n "$lowerings" && "$parts" == *,lowerings,* ]]; then
  python3 -m scaleattn.main --mode=bench "${setting[@]}" \
    --config.bench.dilated_convs="$lowerings" --output="$out/lowerings.json" "$@" || status=$?
fi
exit "$status"
