#!/usr/bin/env bash
# scripts/gpu_session.sh: overlap the model benchmarks with the DALI transfer on a lent GPU.
#
# A device lease is ~15 minutes and DALI needs 9 consecutive calls to arrive
# (scripts/carry_parts.sh), so the model steps of scripts/gpu_check.sh, which need no DALI, run
# in the background while the parts travel:
#   call 1:    scripts/carry_parts.sh stash && scripts/gpu_session.sh background
#   calls 2-8: scripts/carry_parts.sh stash && scripts/gpu_session.sh progress
#   call 9:    scripts/carry_parts.sh stash && scripts/carry_parts.sh join &&
#              scripts/gpu_session.sh finish      (waits for the background, then DALI steps)
# `background` starts gpu_check.sh in its own session (setsid: the device tool ends a call's
# other processes) from a snapshot of the tree, so later calls re-copying the tree cannot
# disturb it. `finish` copies its results to $OUT/model/ and the DALI run's to $OUT/data/.
#
# What travels with which call (64 MiB each, the tree included; ignored paths stay on the
# machine between calls): `scripts/gpu_prepare.sh` makes every folder and prints the calls,
# each with its carry list and command (scripts/carry_plan.py). Call 1 carries .carry/p01
# and .whl (omegaconf: the background needs it); the small wheels of DALI's steps
# (.whl-data), .gpushards and .gpuframes ride with the parts that leave room, so all are
# there before the last call runs
#   GPU_CHECK_SHARDS=.gpushards GPU_CHECK_FRAME_SHARDS=.gpuframes scripts/gpu_session.sh finish
# Used on 2026-11-26 (H100): the 8 part calls took ~5 s each while the model steps ran.
# On 2026-11-28 (H200): the part calls took under 1 s each (~55 s with the tool's turnaround),
# `finish` waited 290 s for the background, and the whole plan held the machine 668 s.
#
# Settings: GPU_SESSION_DIR (default /tmp/tcore_gpu_session), GPU_SESSION_MODEL_STEPS,
# GPU_SESSION_DATA_STEPS (GPU_CHECK_ONLY of each half), GPU_SESSION_WAIT (seconds `finish`
# waits for the background at most, default 300), GPU_CHECK_SHARDS and
# GPU_CHECK_FRAME_SHARDS (as gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_SESSION_DIR:-/tmp/tcore_gpu_session}
MODEL_STEPS=${GPU_SESSION_MODEL_STEPS:-env install agree gputests model_s model_s_compiled model_b model_b_compiled}
DATA_STEPS=${GPU_SESSION_DATA_STEPS:-install data decode_frames data_frames stage_a train gputests_dali}
RESULTS=${OUT:-runs/gpu_session}

case "${1:-}" in
    background)
        rm -rf "$DIR" && mkdir -p "$DIR/out"
        # The snapshot skips the DALI parts (they are stashed elsewhere) and every virtualenv
        # (.venv, the .venv-torch* of scripts/torch_version_check.sh) but keeps .whl.
        tar -cf - --exclude=./.carry --exclude=./.bigwhl --exclude='./.venv*' --exclude=./.git \
            --exclude=./runs . | (mkdir -p "$DIR/tree" && cd "$DIR/tree" && tar -xf -)
        # `done` is written to a temporary name and renamed, so `finish` never reads it empty.
        setsid bash -c "cd '$DIR/tree' && OUT='$DIR/out' GPU_CHECK_ONLY='$MODEL_STEPS' \
            scripts/gpu_check.sh >'$DIR/console.log' 2>&1; echo \$? >'$DIR/done.tmp'; \
            mv '$DIR/done.tmp' '$DIR/done'" </dev/null >/dev/null 2>&1 &
        echo $! >"$DIR/session"   # setsid in the background execs bash: pid = session = group
        sleep 2
        echo "background gpu_check started (steps: $MODEL_STEPS)"
        tail -n 3 "$DIR/console.log" 2>/dev/null
        ;;
    progress)
        [[ -f "$DIR/done" ]] && echo "background finished, rc $(cat "$DIR/done")"
        tail -n 2 "$DIR/console.log" 2>/dev/null || echo "no background run in $DIR"
        ;;
    finish)
        waited=0
        while [[ ! -f "$DIR/done" ]] && ((waited < ${GPU_SESSION_WAIT:-300})); do
            sleep 5; waited=$((waited + 5))
        done
        mkdir -p "$RESULTS/model" "$RESULTS/data"
        if [[ -f "$DIR/done" ]]; then
            echo "background finished (rc $(cat "$DIR/done")) after waiting ${waited}s"
        else
            # Stop it: its benchmarks and the DALI steps must not share the GPU.
            echo "background still running after ${waited}s: stopped, taking what it has written"
            kill -- "-$(cat "$DIR/session")" 2>/dev/null
            tail -n 5 "$DIR/console.log"
        fi
        cp "$DIR"/out/* "$RESULTS/model/" 2>/dev/null
        cat "$DIR/out/summary.txt" 2>/dev/null
        # Inside the device tool's 600 s per call: what the wait left, less a margin.
        budget=$(( ${GPU_CHECK_BUDGET:-360} < 560 - waited ? ${GPU_CHECK_BUDGET:-360} : 560 - waited ))
        OUT="$RESULTS/data" GPU_CHECK_ONLY="$DATA_STEPS" GPU_CHECK_BUDGET=$budget scripts/gpu_check.sh
        ;;
    *)
        echo "usage: scripts/gpu_session.sh background|progress|finish" >&2
        exit 2
        ;;
esac
