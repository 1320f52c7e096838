#!/usr/bin/env bash
# scripts/gpu_data_probe.sh: where the DALI GPU data pipeline's time goes (about 2.5 minutes).
# Run on the GPU machine after scripts/carry_parts.sh has joined DALI (see gpu_session.sh):
#   1. scripts/decode_probe.py: the mixed video decoder alone (threads, pinning, several
#      pipelines at once) on the shards;
#   2. `tcore bench data`: 4 stage B lanes against 1;
#   3. `tcore bench data`: 8 lanes with and without the colour jitter (its contrast centre
#      is a GPU -> CPU dependency).
# Each step is skipped when less than its time is left of GPU_PROBE_BUDGET (seconds).
# Settings: OUT, GPU_CHECK_SHARDS (default .gpushards), PYTHON, GPU_PROBE_BUDGET (150).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_data_probe}
mkdir -p "$OUT"
SHARDS=${GPU_CHECK_SHARDS:-.gpushards}
PY=${PYTHON:-python3}
BUDGET=${GPU_PROBE_BUDGET:-150}
START=$SECONDS

step() {  # NAME SECONDS COMMAND...: run if SECONDS are left, within them
    local name=$1 need=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    if ((left < need)); then echo "== $name: skipped (${left}s left)"; return; fi
    echo "== $name (limit ${left}s)"
    timeout --kill-after=5 "$left" "$@" 2>&1 | tee -a "$OUT/probe.log"
}

shopt -s nullglob
"$PY" -m pip install -q --no-index --no-deps .whl/*.whl "${WHEELS:-/tmp/tcore_wheels}"/*.whl
"$PY" -P -c "import tcore.pipelines" 2>/dev/null ||
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
BENCH=("$PY" -P -m tcore.cli bench data --data "$SHARDS" --device cuda --batch 64 --threads 8
       --seconds 3 --warmup 2 --repeats 2 --loader dali)
step decode 30 "$PY" -P scripts/decode_probe.py "$SHARDS" --batch 64 --batches 3
step lanes4 40 "${BENCH[@]}" --set gpu_lanes=4 --compare overrides=gpu_lanes=1 \
    --json "$OUT/lanes4.json"
step lanes8 40 "${BENCH[@]}" --set gpu_lanes=8 --compare \
    overrides=gpu_lanes=8,views.global_1.jitter_p=0,views.global_2.jitter_p=0,views.local.jitter_p=0 \
    --json "$OUT/lanes8.json"
echo "== done in $((SECONDS - START))s"
