#!/usr/bin/env bash
# The GPU run of bench/step.py, as one command for a lent device machine (see bench/README.md):
# installs the carried torchdistill wheel (.whl/, prepared here with
# `pip download --no-deps -d .whl torchdistill==1.1.5`) into /tmp/site, runs every case,
# method and implementation, and leaves the JSON in bench/results/ and, when set, in $OUT.
# Extra arguments go to bench/step.py (e.g. --cases cifar-b64 --steps 50).
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
out=bench/results/step-gpu-$(date +%F).json
PYTHONUNBUFFERED=1 "$python" bench/step.py --device cuda --out "$out" "$@"
if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
