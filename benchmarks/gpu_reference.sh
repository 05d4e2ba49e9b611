#!/usr/bin/env bash
# The reference grid's 1,000- and 5,000-step rows on one GPU, as far as BUDGET seconds go (default 540).
#   1. seed 0 of every row (every method, the supervised ceiling) at 1,000 and 5,000 steps, and the baselines
#   2. beside it (SEARCH=0 leaves it out): the small search around the CPU recipes of MoCo v3, SimSiam,
#      Barlow Twins, VICReg and DINO at 1,000 steps (half and twice the lr, and each method's main key)
#   3. then, with the time left, seeds 1 and 2 at 1,000 steps
# Cells are resumable (benchmarks/reference.py); a cell stopped by the budget is lost with the machine, the
# finished ones are in $OUT/results.json, $OUT/search.json and the .tgz files (each cell's record, metrics, log).
# SELFSUP_COMMIT=HASH names the commit where the tree has no .git. Run from the repository root with the
# Fashion-MNIST idx files in .gpu_data/fashion-mnist/.
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out} ROOT=${ROOT:-/tmp/reference} JOBS=${JOBS:-6} BUDGET=${BUDGET:-540} SEARCH=${SEARCH:-1}
DEVICE=${DEVICE:-cuda} EXTRA=${EXTRA:-}  # EXTRA="--steps-scale 0.002" DEVICE=cpu: a smoke test of this script
mkdir -p "$OUT" "$ROOT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
lscpu | grep -m1 'Model name'
ref() {  # ROOT LOG JOBS ARGS...: one reference.py run on the GPU, stopped (cleanly) at the budget
    local root=$1 log=$2 jobs=$3 left=$((BUDGET - SECONDS))
    shift 3
    if [ "$left" -lt 60 ]; then echo "== skipped ($left s left): $*" | tee -a "$OUT/$log"; return 0; fi
    echo "== $* ($left s left)" | tee -a "$OUT/$log"
    timeout "$left" python3 benchmarks/reference.py --root "$root" --data-dir .gpu_data --device "$DEVICE" \
        --jobs "$jobs" --groups grid $EXTRA "$@" 2>&1 | grep -v Warning >>"$OUT/$log"
}
pack() {  # ROOT NAME: the results and each cell's record back under $OUT
    [ -f "$1/results.json" ] && cp "$1/results.json" "$OUT/$2.json"
    (cd "$1" && tar czf "$OUT/$2_cells.tgz" logs $(ls -d */cell.json */metrics.jsonl */config.yaml 2>/dev/null))
}
if [ "$SEARCH" = 1 ]; then
    ref /tmp/search search.txt 4 --steps 1000 --seeds 0 \
        --row moco_lr1 moco optim.lr=1.0 --row moco_lr4 moco optim.lr=4.0 \
        --row moco_t0.1 moco moco.temperature=0.1 --row moco_t0.5 moco moco.temperature=0.5 \
        --row simsiam_lr0.2 simsiam optim.lr=0.2 --row simsiam_lr0.8 simsiam optim.lr=0.8 \
        --row simsiam_wd1e-4 simsiam optim.weight_decay=1e-4 \
        --row barlow_twins_lr0.8 barlow_twins optim.lr=0.8 --row barlow_twins_lr3.2 barlow_twins optim.lr=3.2 \
        --row barlow_twins_l0.02 barlow_twins barlow_twins.lambda_offdiag=0.02 \
        --row vicreg_lr0.8 vicreg optim.lr=0.8 --row vicreg_lr3.2 vicreg optim.lr=3.2 \
        --row dino_lr1.5 dino optim.lr=1.5 --row dino_lr6 dino optim.lr=6.0 \
        --row dino_tt0.04 dino dino.teacher_temp=0.04 --row dino_tau0.99 dino dino.base_tau=0.99 \
        --rows moco_lr1,moco_lr4,moco_t0.1,moco_t0.5,simsiam_lr0.2,simsiam_lr0.8,simsiam_wd1e-4,barlow_twins_lr0.8,barlow_twins_lr3.2,barlow_twins_l0.02,vicreg_lr0.8,vicreg_lr3.2,dino_lr1.5,dino_lr6,dino_tt0.04,dino_tau0.99 &
    search=$!
fi
ref "$ROOT" reference.txt "$JOBS" --seeds 0 --steps 1000,5000
[ "$SEARCH" = 1 ] && wait "$search"
ref "$ROOT" reference.txt $((JOBS + 4)) --seeds 1,2 --steps 1000
pack "$ROOT" results
[ "$SEARCH" = 1 ] && pack /tmp/search search
tail -n 40 "$OUT/reference.txt"
[ "$SEARCH" = 1 ] && tail -n 25 "$OUT/search.txt"
echo "== done in $SECONDS s"
