#!/usr/bin/env bash
# GPU check: end-to-end `geoseg predict` vs the bare forward pass on one CUDA device.
# resnet34 U-Net, 16384² px synthetic scene, 2048 px chunks + 64 px halo, bf16/fp16 autocast.
# Target: end-to-end throughput >= 85 % of the bare-forward throughput (ratio <= 1.18).
# Also runs SIZE/2 and prints the marginal ratio, which leaves out fixed start-up costs.
# Then a `geoseg run` batch of SCENES (4) copies of the scene: the marginal seconds per scene
# against the bare forward pass; target: marginal throughput >= 85 % of the bare forward's.
# Runs in about 1.5 minutes on an H100 (plus making the scenes); needs geoseg installed (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
SIZE=${SIZE:-16384}
"$PY" bench_predict.py throughput --size "$SIZE" --encoder resnet34 --chunk 2048 --halo 64 \
    --device cuda --precision auto --base-size $((SIZE / 2))
"$PY" bench_predict.py batch --size "$SIZE" --scenes "${SCENES:-4}" --encoder resnet34 \
    --chunk 2048 --halo 64 --device cuda --precision auto
nproc
