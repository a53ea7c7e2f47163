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
# Further arguments go to compare.py after the script's own (a later --config.* wins);
# PEER_ARGS replaces the peer's flags (default --compile).
#
# Runs benchmarks.compare on the target setting (ResNet-101-ASPP, 3 scales with
# attention, crop 321, batch 8 on one device) for one dtype, with the three lowerings of
# the dilated convolutions and a profile of each (the step alone, augmentation on the
# host, as the peer is timed), against the PyTorch peer with
# torch.compile. Writes compare.md / compare.json and the JAX/PyTorch reports to OUT.
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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
python3 -m benchmarks.compare --config=configs/voc_r101.py \
  --config.bench.dtypes="$dtype" --config.bench.batch_size=8 --config.data.crop_size=321 \
  --config.bench.dilated_convs=native,space_to_batch,taps --config.data.augment_on=host \
  --config.bench.profile_dir=/tmp/scaleattn_profile --config.bench.steps=10 --config.bench.warmup=3 \
  --peer_args="${PEER_ARGS---compile}" --output_dir="$out" "$@"
