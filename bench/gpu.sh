#!/usr/bin/env bash
# The GPU run of bench/step.py, as one command for a lent device machine (see bench/README.md):
# installs the carried torchdistill wheel (.whl/, prepared here with
# `pip download --no-deps -d .whl torchdistill==1.1.5`) into /tmp/site, runs every case and
# method with the default implementations, then the compiled step against the eager one on the
# CIFAR cases, and leaves both JSON files (named by the GPU and the date) in bench/results/ and, when set,
# in $OUT.
# Extra arguments go to both runs (e.g. --steps 20); BENCH_DEVICE=cpu tries the script here.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import torchdistill" 2>/dev/null; then
    ls .whl/torchdistill-*.whl >/dev/null 2>&1 || {
        echo "bench/gpu.sh: torchdistill is missing and no wheel is in .whl/;" \
             "run: pip download --no-deps -d .whl torchdistill==1.1.5" >&2
        exit 2
    }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export PYTHONUNBUFFERED=1
device=${BENCH_DEVICE:-cuda}
log=$(mktemp)
"$python" bench/step.py --device "$device" "$@" | tee "$log"
"$python" bench/step.py --device "$device" --label compile --cases cifar-b64,cifar-b256 \
    --methods vanilla,kd --impls kdflow,kdflow+compile "$@" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
    cp $(sed -n 's/^wrote //p' "$log") "$OUT/"
fi
