#!/usr/bin/env bash
# scripts/gpu_data_probe.sh: where the DALI GPU data pipeline's time goes (about 2 minutes).
# Run on the GPU machine after scripts/carry_parts.sh has joined DALI (see gpu_session.sh):
#   1. scripts/decode_probe.py: the video decoder alone, NVDEC (mixed) against the CPU
#      decoder on 8 and 16 threads;
#   2. `tcore bench data` with the paper presets' views: video_decoder=cpu against
#      video_decoder=gpu (NVDEC; `auto` would decode VP9 on the CPU too).
# (2026-11-26, H100: NVDEC gave ~62 clips/s of 426x320 VP9 whatever the threads, thread
# pinning or number of pipelines; docs/PERFORMANCE.md.)
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
       --seconds 12 --warmup 2 --repeats 3 --loader dali)
step decode 30 "$PY" -P scripts/decode_probe.py "$SHARDS" --configs mixed:8,cpu:8,cpu:16 \
    --batch 64 --batches 3
step decoder 60 "${BENCH[@]}" --set views.color_jitter=torchvision,video_decoder=cpu \
    --compare overrides=views.color_jitter=torchvision,video_decoder=gpu --json "$OUT/decoder.json"
echo "== done in $((SECONDS - START))s"
