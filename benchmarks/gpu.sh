#!/usr/bin/env bash
# The one prepared run for a lent GPU (docs/results/speed.md). About 8 minutes on one H200 (7 with SKIP_SEARCH=1).
#   1. the CPU-default search at fixed step budgets (accuracy does not depend on the device)
#   2. throughput (a)/(b)/(c) for ResNet-50 at 224 px and ResNet-18 at 32 px, bf16
#   3. a torchrun (NCCL) smoke run of the distributed path on one GPU
#   4. ResNet-50 at 224 px streamed from a prepared JPEG store vs the same store in memory, plus nvJPEG (~2-3 min)
#   5. the linear probe on the GPU: a run's selfsup eval linear/knn (PROBE_RUN, a run folder) and
#      feature sets of ResNet-50 and wide-encoder size (benchmarks/probe_gpu.py, ~2 min)
# SKIP_SEARCH=1 leaves out step 1 (its figures do not depend on the device).
# Run from the repository root with the Fashion-MNIST idx files in .gpu_data/fashion-mnist/.
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
if [ -z "${SKIP_SEARCH:-}" ]; then
echo "== search"
timeout 260 python3 benchmarks/cpu_default_search.py --jobs 6 --threads 2 --data-dir .gpu_data --device cuda \
    --out /tmp/search ${SEARCH_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/search.txt"
fi
echo "== linear probe on the GPU"
timeout 110 python3 benchmarks/probe_gpu.py ${PROBE_RUN:+--run "$PROBE_RUN"} --data-dir .gpu_data \
    --synthetic 1281167x2048x1000 --c 0.1 2>&1 | grep -v Warning | tee "$OUT/probe_gpu.txt"
timeout 80 python3 benchmarks/probe_gpu.py --synthetic 200000x8192x10 2>&1 | grep -v Warning | tee -a "$OUT/probe_gpu.txt"
echo "== throughput resnet50 224px bf16"
timeout 100 python3 benchmarks/throughput.py --backbone resnet50 --image-size 224 --source-scale 1.15 --channels 3 \
    --batch-size 256 --precision bf16 --workers 14 --steps 15 --warmup 5 2>&1 | tee "$OUT/throughput_r50.txt"
echo "== throughput resnet18 32px bf16"
timeout 60 python3 benchmarks/throughput.py --backbone resnet18 --image-size 32 --channels 3 \
    --batch-size 512 --precision bf16 --workers 14 --steps 20 --warmup 5 2>&1 | tee "$OUT/throughput_r18.txt"
echo "== torchrun smoke (NCCL, 1 process)"
timeout 60 torchrun --nproc-per-node 1 -m selfsup pretrain --dataset fashion-mnist --data-dir .gpu_data \
    --out /tmp/ddp_run --steps 100 --no-progress --set knn_monitor=false 2>&1 | tail -3 | tee "$OUT/torchrun.txt"
echo "== store: resnet50 224px bf16 from a prepared JPEG store vs in memory (target >= 0.9x), nvJPEG batch decode"
python3 -c "import streaming, simplejpeg" || echo "the store line needs: pip install '.[store]' (mosaicml-streaming, simplejpeg)"
timeout 170 python3 benchmarks/store_throughput.py --only pretrain --num-images 3000 --pretrain-size 224 \
    --backbone resnet50 --batch-size 256 --pretrain-steps 15 --workers 14 --device cuda --nvjpeg \
    --root /tmp/store_bench 2>&1 | grep -v Warning | tee "$OUT/store_r50.txt"
