#!/usr/bin/env bash
# Run the megakernel under compute-sanitizer (memcheck, racecheck, synccheck) on a tiny
# model: a few decode steps through the persistent kernel. Exits non-zero if any tool
# reports an error. Usage: scripts/sanitize.sh [LOG_DIR]
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
