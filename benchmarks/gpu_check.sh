#!/usr/bin/env bash
# GPU check: end-to-end `geoseg predict` vs the bare forward pass on one CUDA device.
# resnet34 U-Net, 16384² px synthetic scene, 2048 px chunks + 64 px halo, bf16/fp16 autocast.
# Target: end-to-end throughput >= 85 % of the bare-forward throughput (ratio <= 1.18).
# Also runs SIZE/2 and prints the marginal ratio, which leaves out fixed start-up costs.
# Then a `geoseg run` batch of SCENES (4) copies of the scene: the marginal seconds per scene
# against the bare forward pass; target: marginal throughput >= 85 % of the bare forward's.
# Then the pipeline's own scaling with cores (null model, `taskset` to 1, 2, 4, 8 and all
# cores; target 1 -> 2 cores >= 1.8x), and vectors streamed while a scene is predicted, the
# forward pass simulated at this GPU's rate (bench_overlap.py --forward-mps).
# Runs in about 4 minutes on an H100 (plus making the scenes); needs geoseg installed (pip install -e .).
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
N=$(nproc)
echo "cores: $N"
for n in 1 2 4 8 "$N"; do
    [ "$n" -le "$N" ] || continue
    echo "== null model on $n core(s)"
    taskset -c "0-$((n - 1))" "$PY" bench_phases.py "../bench_out/scene_$SIZE.tif" \
        ../bench_out/model_resnet34_2048_64 --null-model --chunk 2048 --halo 64 \
        --out ../bench_out/phases_gpu_check 2>&1 | grep -E "predict_scene|MP/s" || true
done
"$PY" bench_overlap.py --size "$SIZE" --repeat 1 --forward-mps "${FORWARD_MPS:-250}"
