#!/usr/bin/env bash
# Everything one round on a GPU machine needs, in one command: build the extension, then the steps
# named on the command line (default: tests bench). Logs and results go under $OUT.
#   scripts/gpu_round.sh [build] [tests] [bench] [profile] [sanitize] [long]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
steps=${*:-tests bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
status=0
for step in $steps; do
    case $step in
        build) ;;
        tests) python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
               [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
        bench) python3 scripts/benchmark.py --json "$OUT/bench.json" --plot "$OUT/bench.png" \
                   2>&1 | tee "$OUT/bench.log" | tail -40 ;;
        profile) MEGAKERNEL_PROFILE=1 python3 -m pip install --no-build-isolation --no-deps -e . \
                   > "$OUT/build-profile.log" 2>&1 && \
                 python3 scripts/benchmark.py --backends megakernel --profile "$OUT" \
                   2>&1 | tee "$OUT/profile.log" | tail -30 ;;
        sanitize) scripts/sanitize.sh "$OUT" || status=1 ;;
        long) python3 -m pytest -m "gpu and slow" -q -rs tests 2>&1 | tee "$OUT/long.log" | tail -15 ;;
        *) echo "unknown step $step"; status=1 ;;
    esac
done
exit $status
