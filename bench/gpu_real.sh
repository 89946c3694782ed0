#!/usr/bin/env bash
# The real-data GPU check (bench/real_cifar.py: He et al. 2016's CIFAR-10 recipe on ResNet-56 and
# ResNet-20, and KD from the one into the other, run as `kdflow run study=cifar10_he2016` on the
# real CIFAR-10 JPEG images) as one command for a lent device machine; see bench/README.md.
#
# Here, once:   bench/gpu_real.sh --prepare
#   copies the 60,000-image archive (18.5 MB; $KDFLOW_CIFAR10_JPG, else
#   ../shared/data/cifar10/cifar10-jpg.tar.xz) to .data/cifar10-jpg.tar.xz and the pure-Python
#   packages `kdflow run` needs beyond the device image (hydra, omegaconf, antlr4) from this
#   checkout's Python to .data/site/ (.data/ is git-ignored; about 20 MB in all).
# There:        bench/gpu_real.sh              (carry: [".data"], timeout_s 600)
#   prints nvidia-smi's line, builds the data cache from .data/cifar10-jpg.tar.xz (about 30 s),
#   runs the study (default: 30 epochs, stopped at REAL_CIFAR_LIMIT = 450 s so that the table
#   is written inside a 10-minute run), prints the table and copies its JSON
#   (bench/results/real-cifar-<gpu>-<date>.json) into $OUT when set.
# Extra arguments go to bench/real_cifar.py (e.g. --epochs 20, --compile none).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    archive=${KDFLOW_CIFAR10_JPG:-../shared/data/cifar10/cifar10-jpg.tar.xz}
    mkdir -p .data/site
    cp "$archive" .data/cifar10-jpg.tar.xz
    site=$("$python" -c "import os, hydra; print(os.path.dirname(os.path.dirname(hydra.__file__)))")
    for pkg in hydra omegaconf antlr4; do
        rm -rf ".data/site/$pkg"
        cp -r "$site/$pkg" .data/site/
    done
    cp -r "$site"/hydra_core-*.dist-info "$site"/omegaconf-*.dist-info \
        "$site"/antlr4_python3_runtime-*.dist-info .data/site/
    find .data/site -name __pycache__ -prune -exec rm -rf {} +
    du -sh .data
    exit 0
fi
python=${PYTHON:-python3}
if ! "$python" -c "import hydra, omegaconf" 2>/dev/null; then
    [ -d .data/site ] || {
        echo "bench/gpu_real.sh: hydra/omegaconf are missing and .data/site is not here;" \
             "run bench/gpu_real.sh --prepare on the machine with the checkout, carry .data" >&2
        exit 2
    }
    export PYTHONPATH=$PWD/.data/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${KDFLOW_CIFAR10_JPG:-}" ] && [ -f .data/cifar10-jpg.tar.xz ]; then
    export KDFLOW_CIFAR10_JPG=$PWD/.data/cifar10-jpg.tar.xz
fi
export KDFLOW_DATA_CACHE=${KDFLOW_DATA_CACHE:-/tmp/kdflow-data}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
log=$(mktemp)
status=0
"$python" bench/real_cifar.py --device "${BENCH_DEVICE:-cuda}" \
    --time-limit "${REAL_CIFAR_LIMIT:-450}" "$@" 2>&1 | tee "$log" || status=$?
if [ -n "${OUT:-}" ]; then
    cp $(sed -n 's/^wrote //p' "$log") "$OUT/" 2>/dev/null || true
    cp "$log" "$OUT/real_cifar.log"
fi
exit "$status"
