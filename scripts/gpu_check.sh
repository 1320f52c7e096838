#!/usr/bin/env bash
# scripts/gpu_check.sh: tcore's one-shot performance check on a GPU machine with no network.
#
#   scripts/gpu_check.sh                 # on the GPU machine (about 6 minutes)
#   GPU_CHECK_CPU=1 scripts/gpu_check.sh # the same steps at tiny sizes on the CPU (the test)
#   scripts/gpu_check.sh --fetch-wheels  # here, with PyPI: put the wheels that travel in .whl/
#   scripts/gpu_prepare.sh               # here: every wheel, both shard sets, the calls
#
# DALI with its GPU libraries (494 MB of wheels) is over the 64 MiB one device call carries:
# download it into the ignored .bigwhl/ with GPU_CHECK_WHEELS="nvidia-dali-cuda120==2.4.0
# nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76
# nvidia-libnvcomp-cu12==5.3.0.16 nvidia-nvjpeg2k-cu12==0.11.0.51 nvidia-nvtiff-cu12==0.8.0.82"
# WHEEL_DIR=.bigwhl GPU_CHECK_PYVER=3.12 scripts/gpu_check.sh --fetch-wheels, split it with
# `scripts/carry_parts.sh split .bigwhl/*.whl` (9 folders of <= 57 MB), send one .carry/pNN
# per call running `scripts/carry_parts.sh stash`, and on the last one (carrying .whl too)
# `scripts/carry_parts.sh join && scripts/gpu_check.sh`. The device image has no PyAV to
# build the synthetic shards with: build them here into the ignored .gpushards/ (`tcore data
# synth /tmp/gpusrc --videos 64 --frames 48 --size 426x320 --davis-videos 0 && tcore shards
# build /tmp/gpusrc/train .gpushards --short-side 320 --samples-per-shard 16`, ~5 MB), carry
# it with one of the parts and set GPU_CHECK_SHARDS=.gpushards.
#
# Steps: install what travels (.whl/*.whl, then this project) -> xFormers vs SDPA agreement ->
# `gputests` (the CUDA-only tests that need no DALI) -> `tcore bench model` ViT-S/16 and
# ViT-B/16 (xFormers vs SDPA, bf16, compiled or not, against eager fp32 math attention) ->
# with DALI: synthetic shards (or the carried ones), `tcore bench data --device gpu` (the
# clips decoded on the CPU threads, exact against fast jitter), `data_frames` (exact jitter,
# its colour stage as CUDA graphs against launched; nvJPEG on the JPEG-frame shards, when
# GPU_CHECK_FRAME_SHARDS holds some, after `decode_frames`: the JPEG decoder alone,
# scripts/jpeg_decode_probe.py; then `stage_a`, the loader's stage A alone on the host
# cores), `tcore bench train` from the JPEG frames when they are there, else the clips
# (`train_compiled`: the step compiled; `train_priority`: the same on a high-priority CUDA
# stream; `train_static`: the same with the colour stage compiled for each crop shape;
# `train`: eager, the colour stage as CUDA graphs against launched), then
# `gputests_dali` (tests/test_gpu.py's loader and colour-stage tests on $SHARDS and $FRAMES)
# -> one short table. A failing step is logged and the script goes on.
#
# Results: $OUT (default runs/gpu_check): gpu_check.log (everything), summary.txt (the table),
# reports.json (every bench report, by step name), profile.tar.gz (kernel and CPU tables of the
# profiled model and train steps). Few files
# on purpose: the device tool brings back at most 8.
#
# Settings (environment): OUT, PYTHON (default python3; .venv/bin/python in CPU mode),
# GPU_CHECK_BUDGET (seconds for all steps, default 360), GPU_CHECK_ONLY (space-separated step
# names to run: env install agree gputests model_s model_s_compiled model_b model_b_compiled
# shards data decode_frames data_frames stage_a train_compiled train_priority train_static
# train_ahead train gputests_dali; model_s_autotune, data_prefetch and data_producer run only
# when named here),
# GPU_CHECK_SHARDS (use these shards instead of building synthetic ones),
# GPU_CHECK_FRAME_SHARDS (`--codec jpegs` shards, optional: nvJPEG data step and tests),
# GPU_CHECK_TESTS (a pytest -k expression: which GPU tests run; all when unset),
# GPU_CHECK_WORK (scratch folder, kept; default a fresh temporary one, removed at exit).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

# ---- --fetch-wheels: run on a machine with PyPI, before sending the tree to the GPU --------
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # The device image has torch, timm, torchvision, click, PyYAML but not omegaconf: that is
    # the default. GPU_CHECK_WHEELS names others instead; for DALI's data and train steps the
    # small ones are "omegaconf antlr4-python3-runtime==4.9.3 webdataset braceexpand astunparse
    # gast libcst makefun optree nvtx" (into .whl/) and the large ones go to .bigwhl/ (above).
    # Not yet tried on a device machine.
    PYVER=${GPU_CHECK_PYVER:-3.12}
    DEST=${WHEEL_DIR:-.whl}
    mkdir -p "$DEST"
    PIP=${PIP:-$REPO/.venv/bin/pip}
    "$PIP" download --dest "$DEST" --no-deps --only-binary=:all: --python-version "$PYVER" \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        ${GPU_CHECK_WHEELS:-omegaconf} || exit 1
    du -sh "$DEST"/*.whl
    exit 0
fi

CPU_MODE=${GPU_CHECK_CPU:-0}
OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then
    WORK=$GPU_CHECK_WORK
else    # a scratch folder of our own: everything kept is copied to $OUT, so it goes at exit
    WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/reports" "$WORK/profile"
LOG="$OUT/gpu_check.log"
: >"$LOG"
BUDGET=${GPU_CHECK_BUDGET:-360}
START=$SECONDS
if [[ "$CPU_MODE" == 1 && -z "${PYTHON:-}" && -x "$REPO/.venv/bin/python" ]]; then
    PYTHON=$REPO/.venv/bin/python
fi
PYTHON=${PYTHON:-python3}
TCORE=("$PYTHON" -P -m tcore.cli)  # -P: the checkout's tcore/ must not shadow the installed package
declare -A STATUS=()
ORDER=()

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

wanted() {  # is step $1 selected by GPU_CHECK_ONLY (all steps when unset)?
    [[ -z "${GPU_CHECK_ONLY:-}" ]] && return 0
    [[ " ${GPU_CHECK_ONLY} " == *" $1 "* ]]
}

# run_step NAME CAP_SECONDS COMMAND...: runs within min(CAP, what is left of the budget).
run_step() {
    local name=$1 cap=$2
    shift 2
    wanted "$name" || return 0
    ORDER+=("$name")
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 10)); then
        STATUS[$name]="skipped (budget spent)"
        log "$name: skipped, budget spent"
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    log "$name: start (limit ${limit}s): $*"
    local began=$SECONDS
    if declare -F "$1" >/dev/null; then
        # A shell function: `timeout` needs a program, so hand the function and the variables
        # it reads to a child bash.
        timeout --kill-after=10 "$limit" bash -c "$(declare -p PYTHON REPO WORK SHARDS FRAMES SYNTH GPU_TESTS_GROUP \
            2>/dev/null); $(declare -f "$1"); $1" >>"$LOG" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    fi
    local rc=$?
    local took=$((SECONDS - began))
    case $rc in
        0) STATUS[$name]="ok (${took}s)" ;;
        124 | 137) STATUS[$name]="TIMEOUT after ${limit}s" ;;
        *) STATUS[$name]="FAILED rc=$rc (${took}s)" ;;
    esac
    log "$name: ${STATUS[$name]}"
    return 0
}

# ---- sizes: the real ones on the GPU, tiny ones on the CPU -------------------------------
if [[ "$CPU_MODE" == 1 ]]; then
    DEVICE=cpu
    ARCH_S=vit_tiny ARCH_B=vit_tiny
    PRECISION=fp32 FAST=sdpa        # xFormers has no CPU kernels: SDPA stands in for it
    SLOW_PRECISION=fp32 REF=math
    MODEL_OVERRIDES=model.head.prototypes=256,model.head.hidden=256
    MODEL_ARGS=(--batch 1 --global-size 112 --local-size 48 --local-crops 1 --warmup 1
                --repeats 2 --steps 1 --peak-size 256 --set "$MODEL_OVERRIDES")
    DATA_ARGS=(--batch 2 --threads 2 --seconds 2 --warmup 1 --repeats 2 --loader both)
    DATA_COMPARE=()
    FRAMES_COMPARE=()
    TRAIN_ARGS=(--batch 2 --threads 2 --warmup 1 --steps 2 --repeats 2)
    # The train steps' --set (compiled_train's steps add their own key to it).
    TRAIN_SET=model.head.prototypes=256,model.head.hidden=256,model.img_size=112,data.pipeline.views.global_size=112,data.pipeline.views.local_size=48,data.pipeline.views.n_local=1
    TRAIN_COMPARE=()
    JPEG_PROBE_ARGS=(--configs cpu:2:three,cpu:2:one --batch 2 --batches 3)
    SYNTH=(videos=8 frames=24 size=160x128 short_side=128)
    STAGE_A_SECONDS=1
    COMPILE_DEFAULT=0
else
    DEVICE=cuda
    ARCH_S=vit_small ARCH_B=vit_base
    PRECISION=bf16 FAST=xformers
    SLOW_PRECISION=fp32 REF=sdpa
    MODEL_OVERRIDES=
    MODEL_ARGS=(--batch 64 --warmup 3 --repeats 5 --steps 3)  # eager fp32 ViT-B: ~1 s a step
    # No PyAV there, so no baseline loader. NVDEC was measured on 2026-11-26 (62 clips/s
    # whatever the settings, PERFORMANCE.md), so the clips are decoded on the CPU threads
    # (video_decoder=cpu), views on the GPU, with the paper presets' torchvision jitter
    # against the fast one; the JPEG frames (nvJPEG) likewise.
    DATA_ARGS=(--batch 64 --threads 16 --seconds 8 --warmup 8 --repeats 3 --loader dali)
    DATA_COMPARE=(--set views.color_jitter=torchvision,video_decoder=cpu
                  --compare overrides=views.color_jitter=fast,video_decoder=cpu)
    # The exact jitter's colour stage replayed as CUDA graphs against launched from Python
    # (on the H200, 2026-11-28, the launched stage was ~16 ms of next()'s host time a batch;
    # the fast jitter then ran at 0.47x the exact one, PERFORMANCE.md).
    FRAMES_COMPARE=(--set views.color_jitter=torchvision,photometric_graphs=true
                    --compare overrides=views.color_jitter=torchvision,photometric_graphs=false)
    # 40 steps in 5 windows: on the H200 one window of 3 held a stall (0.42 s a step).
    TRAIN_ARGS=(--batch 64 --threads 16 --warmup 5 --steps 40 --repeats 5)
    TRAIN_SET=
    # The same in training (stage A in a process, the GPU default: 1.07x a thread there).
    TRAIN_COMPARE=(--set data.pipeline.photometric_graphs=true
                   --compare overrides=data.pipeline.photometric_graphs=false)
    JPEG_PROBE_ARGS=(--configs mixed:16:three,mixed:16:one,cpu:16:three,cpu:16:one
                     --batch 64 --batches 8)
    SYNTH=(videos=32 frames=24 size=426x320 short_side=320)
    STAGE_A_SECONDS=8
    COMPILE_DEFAULT=1
fi
COMPILE=${GPU_CHECK_COMPILE:-$COMPILE_DEFAULT}
SHARDS=${GPU_CHECK_SHARDS:-$WORK/shards}
[[ -d "$SHARDS" ]] && SHARDS=$(cd "$SHARDS" && pwd)  # the tests run tcore from elsewhere
# Optional `--codec jpegs` shards (built here like SHARDS): nvJPEG data steps and tests.
FRAMES=${GPU_CHECK_FRAME_SHARDS:-}
[[ -d "$FRAMES" ]] && FRAMES=$(cd "$FRAMES" && pwd)
[[ -f "$FRAMES/manifest.json" ]] || FRAMES=   # not carried: the clip shards serve instead
log "mode: $([[ $CPU_MODE == 1 ]] && echo CPU || echo GPU), python: $PYTHON, out: $OUT, work: $WORK"

# ---- 1. environment and installation ----------------------------------------------------
environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    # NVDEC (DALI's mixed video decoder) needs the driver's libnvcuvid.
    { ldconfig -p 2>/dev/null; ls /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu 2>/dev/null; } \
        | grep -m1 -o 'libnvcuvid[^ ]*' || echo "libnvcuvid: not found"
    "$PYTHON" -P - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "timm", "omegaconf", "click", "xformers", "nvidia.dali", "av", "webdataset"):
    try:
        module = importlib.import_module(name)
        print(f"{name:12s} {getattr(module, '__version__', 'present')}")
    except Exception as error:  # absent, or present but broken
        print(f"{name:12s} MISSING ({type(error).__name__}: {str(error)[:80]})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}

install() {
    # Wheels first (their dependencies are either in the image or among the wheels), then the
    # project without dependencies. preprocess/ and pipelines/ install *inside* tcore
    # (setup.cfg package_dir), so a plain PYTHONPATH=. cannot work; when pip cannot install
    # the project, a folder of links gives the same package layout.
    shopt -s nullglob
    # .whl/ travels with the call; wheels too large for that were sent in parts and joined
    # into $WHEELS by scripts/carry_parts.sh (DALI and its nvImageCodec / nvJPEG / nvCOMP).
    local joined=${WHEELS:-/tmp/tcore_wheels}
    # .whl-data/ (scripts/gpu_prepare.sh) holds the small wheels only DALI's steps need.
    local wheels=(.whl/*.whl .whl-data/*.whl "$joined"/*.whl)
    if ((${#wheels[@]})); then
        "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}" || return 1
    fi
    # Already installed from *this* checkout (not, say, from gpu_session.sh's snapshot)?
    if "$PYTHON" -P -c "import sys, tcore.pipelines, tcore.bench
sys.exit(0 if tcore.pipelines.__file__.startswith('$REPO/') else 1)" 2>/dev/null; then
        echo "tcore already installed from $REPO"
        return 0
    fi
    if "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e . ; then
        return 0
    fi
    echo "pip could not install the project; linking it under $WORK/site instead"
    mkdir -p "$WORK/site/tcore"
    for entry in tcore/*; do ln -sfn "$REPO/$entry" "$WORK/site/tcore/$(basename "$entry")"; done
    ln -sfn "$REPO/preprocess" "$WORK/site/tcore/preprocess"
    ln -sfn "$REPO/pipelines" "$WORK/site/tcore/pipelines"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "export PYTHONPATH=$PYTHONPATH" >"$WORK/env.sh"
}

run_step env 60 environment
if [[ "$CPU_MODE" != 1 ]] || [[ -n "${GPU_CHECK_INSTALL:-}" ]]; then
    wanted install && { log "install: start"; install >>"$LOG" 2>&1 && STATUS[install]=ok || STATUS[install]=FAILED; ORDER+=(install); log "install: ${STATUS[install]}"; }
fi
[[ -f "$WORK/env.sh" ]] && source "$WORK/env.sh"

has_module() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# ---- 2. attention agreement --------------------------------------------------------------
# Without xFormers, "xformers" runs as SDPA: check SDPA against explicit matmuls instead.
AGREE_REF=$REF
if [[ "$FAST" == xformers ]] && ! has_module xformers; then AGREE_REF=math; fi
run_step agree 90 "${TCORE[@]}" bench agree --arch "$ARCH_S" --attention "$FAST" \
    --reference "$AGREE_REF" --precision "$PRECISION" --device "$DEVICE" \
    --json "$WORK/reports/agree.json"

# ---- 2b. the tests only a GPU can run, in two groups: `gputests` needs no DALI (the step,
# optimizer, attention and host-sync tests, first so that a slow DALI test cannot starve
# them); `gputests_dali` (section 4, when DALI imports) holds the loader and colour-stage ones.
gpu_tests() {  # GPU_TESTS_GROUP: core | dali
    local shards_env=()
    [[ -f "$SHARDS/manifest.json" ]] && shards_env=(TCORE_GPU_SHARDS="$SHARDS")
    [[ -f "$FRAMES/manifest.json" ]] && shards_env+=(TCORE_GPU_FRAME_SHARDS="$FRAMES")
    local core="fused_adamw_on_cuda or mixed_precision_step or davis_evaluation_on_cuda"
    local tests=(tests/test_gpu.py) filter="not ($core)"
    if [[ "$GPU_TESTS_GROUP" == core ]]; then
        tests=(tests/test_models_vit.py::test_attention_backends_agree_in_bf16_on_gpu
               tests/test_models_vit.py::test_xformers_agrees_with_the_reference_in_bf16_on_gpu
               tests/test_ssl.py::test_step_has_no_host_syncs_on_gpu
               tests/test_optim.py::test_listed_adamw_steps_exactly_as_torchs_fused_adamw
               tests/test_optim.py::test_listed_adamw_under_a_gradient_scaler_skips_inf_steps_as_torch_does
               tests/test_gpu.py)
        filter="$core or bf16_on_gpu or host_syncs_on_gpu or listed_adamw"
    fi
    [[ -n "${GPU_CHECK_TESTS:-}" ]] && filter="($filter) and ($GPU_CHECK_TESTS)"
    # --noconftest: the shared fixtures build shards with PyAV, which the GPU machine lacks.
    # A test still running after 60 s gets every thread's stack printed (the log says where).
    local rc=0
    env "${shards_env[@]}" "$PYTHON" -P -m pytest -q -s -v --noconftest -p no:cacheprovider \
        -o faulthandler_timeout=60 -k "$filter" "${tests[@]}" || rc=$?
    # 5: GPU_CHECK_TESTS named only tests of the other group; not a failure of this one.
    if ((rc == 5)); then echo "no tests of group $GPU_TESTS_GROUP selected"; return 0; fi
    return $rc
}
GPU_TESTS_GROUP=core
run_step gputests 120 gpu_tests

# ---- 3. the model step ------------------------------------------------------------------
# model_x: the fast attention against the other fused one (same precision, eager);
# model_x_compiled: compiled fast attention against eager fp32 math attention (the 3x target).
bench_model() {  # NAME ARCH CAP ARGS...
    local name=$1 arch=$2 cap=$3
    shift 3
    run_step "$name" "$cap" "${TCORE[@]}" bench model --arch "$arch" --device "$DEVICE" \
        "${MODEL_ARGS[@]}" --json "$WORK/reports/$name.json" "$@"
}
COMPILE_FLAG=()
[[ "$COMPILE" == 1 ]] && COMPILE_FLAG=(--compile)
bench_model model_s "$ARCH_S" 120 --attention "$FAST" --precision "$PRECISION" \
    --compare "attention=$REF" --profile "$WORK/profile/model_s"
bench_model model_s_compiled "$ARCH_S" 200 --attention "$FAST" --precision "$PRECISION" \
    "${COMPILE_FLAG[@]}" --compare "attention=math,precision=$SLOW_PRECISION,compile=false" \
    --profile "$WORK/profile/model_s_compiled"
bench_model model_b "$ARCH_B" 120 --attention "$FAST" --precision "$PRECISION" \
    --compare "attention=$REF"
# Only when named in GPU_CHECK_ONLY: the compiled step with Inductor's Triton matmuls and
# fused epilogues (train.compile_mode), against model_s_compiled; minutes of autotuning, so
# raise GPU_CHECK_BUDGET for it (a step never gets more than what is left of the budget).
if [[ -n "${GPU_CHECK_ONLY:-}" ]]; then
    bench_model model_s_autotune "$ARCH_S" 400 --attention "$FAST" --precision "$PRECISION" \
        "${COMPILE_FLAG[@]}" \
        --set "${MODEL_OVERRIDES:+$MODEL_OVERRIDES,}train.compile_mode=max-autotune-no-cudagraphs" \
        --profile "$WORK/profile/model_s_autotune"
fi

# ---- 4. data and end to end (needs DALI) ---------------------------------------------------
build_shards() {
    [[ -f "$SHARDS/manifest.json" ]] && { echo "shards already at $SHARDS"; return 0; }
    "$PYTHON" -P - "$WORK/synth" "$SHARDS" "${SYNTH[@]}" <<'EOF'
import sys
from tcore.preprocess.shards import build_shards
from tcore.preprocess.synth import make_synthetic

synth, shards = sys.argv[1], sys.argv[2]
opts = dict(item.split("=", 1) for item in sys.argv[3:])
make_synthetic(synth, seed=0, videos=int(opts["videos"]), frames=int(opts["frames"]),
               size=opts["size"], davis_videos=0)
manifest = build_shards(f"{synth}/train", shards, frames=20, short_side=int(opts["short_side"]),
                        codec="vp9", samples_per_shard=16, workers=4, progress=False)
print("built", manifest["total_samples"], "samples,", manifest["total_bytes"], "bytes")
EOF
}
if has_module nvidia.dali; then
    run_step shards 90 build_shards
    run_step data 150 "${TCORE[@]}" bench data --data "$SHARDS" --device "$DEVICE" \
        "${DATA_ARGS[@]}" "${DATA_COMPARE[@]}" --json "$WORK/reports/data.json"
    if [[ -f "$FRAMES/manifest.json" ]]; then
        # The three drawn JPEGs decoded and nothing else: does nvJPEG bound stage B, and
        # would one decoder over 3 x B images beat three of B each?
        rm -f "$WORK/reports/decode_frames.jsonl"    # a reused GPU_CHECK_WORK: no stale lines
        run_step decode_frames 60 "$PYTHON" -P scripts/jpeg_decode_probe.py "$FRAMES" \
            "${JPEG_PROBE_ARGS[@]}" --out "$WORK/reports/decode_frames.jsonl"
        run_step data_frames 90 "${TCORE[@]}" bench data --data "$FRAMES" --device "$DEVICE" \
            "${DATA_ARGS[@]}" "${FRAMES_COMPARE[@]}" --json "$WORK/reports/data_frames.json"
        # Stage A alone (read, draws, masks, pickle) on this machine's host cores: the most
        # the loader can deliver whatever the GPU does (it never touches the device).
        run_step stage_a 40 "${TCORE[@]}" bench data --data "$FRAMES" --loader stage-a \
            --device cpu --batch 64 --seconds "$STAGE_A_SECONDS" --warmup 3 --repeats 3 \
            --json "$WORK/reports/stage_a.json"
        # Only when asked for (GPU_CHECK_ONLY): stage B four batches deep against two, and
        # stage A in a thread against its own process, exact jitter.
        if [[ -n "${GPU_CHECK_ONLY:-}" ]]; then
            run_step data_prefetch 90 "${TCORE[@]}" bench data --data "$FRAMES" \
                --device "$DEVICE" "${DATA_ARGS[@]}" \
                --set views.color_jitter=torchvision,prefetch=4 \
                --compare overrides=views.color_jitter=torchvision,prefetch=2 \
                --json "$WORK/reports/data_prefetch.json"
            run_step data_producer 90 "${TCORE[@]}" bench data --data "$FRAMES" \
                --device "$DEVICE" "${DATA_ARGS[@]}" \
                --set views.color_jitter=torchvision,producer=process \
                --compare overrides=views.color_jitter=torchvision,producer=thread \
                --json "$WORK/reports/data_producer.json"
        fi
    fi
    # `bench train` of the compiled step, profiled, with KEY=VALUE added to TRAIN_SET. From
    # the JPEG frames when they are there (the faster decode), else clips.
    compiled_train() {  # compiled_train NAME [KEY=VALUE]
        local name=$1 settings=${TRAIN_SET:-}
        [[ -n ${2:-} ]] && settings=${settings:+$settings,}$2
        run_step "$name" 200 "${TCORE[@]}" bench train --data "${FRAMES:-$SHARDS}" \
            --arch "$ARCH_S" --attention "$FAST" --precision "$PRECISION" --device "$DEVICE" \
            "${TRAIN_ARGS[@]}" ${settings:+--set "$settings"} "${COMPILE_FLAG[@]}" \
            --json "$WORK/reports/$name.json" --profile "$WORK/profile/$name"
    }
    # End to end, the step compiled (against its own model-only phases): the end-to-end
    # target at the step's best, before the eager comparison below, which has a figure
    # already. Its timeline says whether the step beside the loader waits for the host or
    # shares the device with the loader's streams (on the H200 it ran 86 ms, alone 66 ms).
    compiled_train train_compiled
    # The same with the step on a CUDA stream above the loader's: whether the colour stage's
    # kernels then fill the step's gaps instead of delaying its kernels. Inductor's cache is
    # warm from train_compiled.
    compiled_train train_priority train.step_stream=high_priority
    # The same with the colour stage compiled for each crop shape (sizes as constants in its
    # kernels): its device time a batch is the profile's `tcore.loader.torch_photometric`.
    compiled_train train_static data.pipeline.photometric_static_shapes=true
    # The same with each batch made ahead in a thread of the loader, so next()'s host work
    # (22 ms a step on the H200) runs beside the step's launches.
    compiled_train train_ahead data.pipeline.assemble_ahead=1
    # Eager, the colour stage as CUDA graphs against launched (TRAIN_COMPARE).
    run_step train 150 "${TCORE[@]}" bench train --data "${FRAMES:-$SHARDS}" --arch "$ARCH_S" \
        --attention "$FAST" --precision "$PRECISION" --device "$DEVICE" "${TRAIN_ARGS[@]}" \
        ${TRAIN_SET:+--set "$TRAIN_SET"} "${TRAIN_COMPARE[@]}" --json "$WORK/reports/train.json" \
        --profile "$WORK/profile/train"
    # The loader and colour-stage tests after the measurements: the group runs two `tcore
    # train` processes and Triton compiles, and a group stopped at its limit must not have
    # taken the measurements' time with it.
    GPU_TESTS_GROUP=dali
    run_step gputests_dali 300 gpu_tests
else
    for name in shards gputests_dali data decode_frames data_frames stage_a data_prefetch data_producer train_compiled train_priority train_static train_ahead train; do
        wanted "$name" && { ORDER+=("$name"); STATUS[$name]="skipped (no DALI)"; log "$name: skipped, DALI not installed"; }
    done
fi

# The second compiled model last: it is the step most likely not to fit the budget.
bench_model model_b_compiled "$ARCH_B" 200 --attention "$FAST" --precision "$PRECISION" \
    "${COMPILE_FLAG[@]}" --compare "attention=math,precision=$SLOW_PRECISION,compile=false" \
    --profile "$WORK/profile/model_b_compiled"

# ---- 5. the table -----------------------------------------------------------------------
reports=()
for name in "${ORDER[@]}"; do  # in the order the steps ran
    [[ -f "$WORK/reports/$name.json" ]] && reports+=("$WORK/reports/$name.json")
done
{
    echo "tcore gpu_check, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START))s, mode $([[ $CPU_MODE == 1 ]] && echo CPU || echo GPU)"
    for name in "${ORDER[@]}"; do printf '  %-18s %s\n' "$name" "${STATUS[$name]}"; done
    if ((${#reports[@]})); then "${TCORE[@]}" bench table --targets "${reports[@]}"; fi
    for timeline in "$WORK"/profile/*/timeline.txt; do
        [[ -f $timeline ]] || continue
        echo "timeline of $(basename "$(dirname "$timeline")") (profiled steps):"
        sed 's/^/  /' "$timeline"
    done
    if [[ -s "$WORK/reports/decode_frames.jsonl" ]]; then
        echo "decode_frames (JPEG decode only):"
        cat "$WORK/reports/decode_frames.jsonl"
    fi
} >"$OUT/summary.txt" 2>&1
"$PYTHON" -P - "$OUT/reports.json" "${reports[@]}" <<'EOF'
import json, os, sys
from pathlib import Path
out, paths = sys.argv[1], sys.argv[2:]
bundle = {Path(p).stem: json.loads(Path(p).read_text()) for p in paths}
Path(out + ".tmp").write_text(json.dumps(bundle, indent=1))
os.replace(out + ".tmp", out)
EOF
if compgen -G "$WORK/profile/*/kernels.txt" >/dev/null; then
    tar -czf "$OUT/profile.tar.gz" -C "$WORK/profile" --exclude='trace.json' .
fi
cat "$OUT/summary.txt" | tee -a "$LOG"
failed=0
for name in "${ORDER[@]}"; do [[ "${STATUS[$name]}" == FAILED* ]] && failed=1; done
exit $failed
