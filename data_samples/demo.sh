#!/usr/bin/env bash
# The demo job: a model bundle, then prediction on the sample scenes, CPU, local Dask.
set -euo pipefail
GEOSEG=${1:-geoseg}
cd "$(dirname "$0")/.."
OUT=out/demo
mkdir -p "$OUT"
if [ ! -d "$OUT/model" ]; then
  "$GEOSEG" model init "$OUT/model" --name demo-random --bands 1 --dtype uint16 --scale 2047 \
    --classes background,building,road --gsd 0.5
fi
"$GEOSEG" predict data_samples/sample_geotiff.tif data_samples/road_mask_input.tif \
  --model "$OUT/model" --out "$OUT" --device cpu
