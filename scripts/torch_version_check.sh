#!/usr/bin/env bash
# scripts/torch_version_check.sh: the test suite (CPU) under another torch release, by default
# the GPU machine's (torch 2.11.0, torchvision 0.26.0, timm 1.0.29), so that a difference
# between releases shows up here and not during a short GPU lease. On 2026-11-26 it found
# one: torch 2.11's Inductor drops a float64 -> float32 -> float64 round trip, which moved
# hue-shifted pixels.
#
#   scripts/torch_version_check.sh [PYTEST ARGS...]      # e.g. tests/test_torch_photometric.py
#   TORCH_CHECK_VERSION=2.11.0 TORCHVISION_CHECK_VERSION=0.26.0 TIMM_CHECK_VERSION=1.0.29 \
#       TORCH_CHECK_PYTHON=python3.12 scripts/torch_version_check.sh
#
# The first run builds .venv-torch<VERSION>-py<X.Y>/ (ignored; about 3 GB from PyPI: torch's
# CUDA build, which runs on the CPU too) with TORCH_CHECK_PYTHON (default python3; the GPU
# machine runs 3.12), the project's other dependencies at constraints.txt's versions and
# without xFormers (it pins its own torch). Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH_CHECK_VERSION:-2.11.0}
VISION=${TORCHVISION_CHECK_VERSION:-0.26.0}
TIMM=${TIMM_CHECK_VERSION:-1.0.29}
PYTHON=${TORCH_CHECK_PYTHON:-python3}
VENV=.venv-torch$TORCH-py$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ ! -f "$VENV/.installed" ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$VISION"
    grep -v -E '^(torch|torchvision|xformers)==' constraints.txt >"$VENV/constraints.txt"
    # setup.cfg's dependencies but torch, torchvision and xformers (and setuptools, which a
    # Python 3.12 venv lacks, for the editable install), then the project itself.
    "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "timm==$TIMM" webdataset nvidia-dali-cuda120 \
        numpy 'click>=8' av omegaconf pillow safetensors tqdm scipy matplotlib tensorboard \
        pytest pytest-timeout setuptools
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -c "import sys, timm, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)"
# Inductor's cache of its own: in the shared default (/tmp/torchinductor_$USER) the two
# releases' compiled C++ headers meet, and the other release's tests then fail to compile
# (seen 2026-11-29: "'at::vec' has not been declared" under torch 2.14 beside a 2.11 run).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/$VENV/inductor-cache}
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
