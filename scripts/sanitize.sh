#!/usr/bin/env bash
# Run the megakernel under compute-sanitizer (memcheck, racecheck, synccheck) on a tiny
# model: a few greedy decode steps through the persistent kernel, then a few of each
# sampled kind (temperature alone, top-k, top-p, both), which run the kernel's sampling
# instance. Exits non-zero if any tool reports an error. Usage: scripts/sanitize.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-sanitize-logs}}
mkdir -p "$LOG_DIR"
SANITIZER=${COMPUTE_SANITIZER:-compute-sanitizer}
PROGRAM='
import megakernel
engine = megakernel.Engine.from_pretrained("random:tiny", backend="megakernel", max_seq_len=64)
result = engine.generate([1, 2, 3, 4, 5], max_new_tokens=6, ignore_eos=True)
print("tokens", result.token_ids)
for kw in (dict(temperature=0.8), dict(temperature=0.8, top_k=50),
           dict(temperature=1.0, top_p=0.9), dict(temperature=0.8, top_k=50, top_p=0.9)):
    result = engine.generate([1, 2, 3, 4, 5], max_new_tokens=6, ignore_eos=True, seed=1, **kw)
    print(kw, "tokens", result.token_ids)
'
status=0
for tool in memcheck racecheck synccheck; do
    log="$LOG_DIR/sanitize-$tool.log"
    extra=()
    [ "$tool" = memcheck ] && extra=(--leak-check no)
    "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 --target-processes all \
        python3 -c "$PROGRAM" > "$log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
    echo "$tool: exit $rc; ${summary:-no summary line}"
    [ $rc -eq 0 ] || status=1
done
exit $status
