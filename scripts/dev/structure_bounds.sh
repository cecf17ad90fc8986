#!/usr/bin/env bash
# What the kernel's structure costs, bounded on the real kernel: each variant is a copy of
# the tree with one or more patches, built in place; the builds run alternated in one call
# (code changes move a step by several us, so only a same-call A/B means anything). Most
# patches make the math wrong on purpose: only the time means something. RESULTS entry 83.
#
#   VARIANTS="base W0 W0+S66" [ROUNDS=2] [BENCH="..."] [PROFILE=1 PROFILE_DIR=DIR]
#       scripts/dev/structure_bounds.sh            (from the repository root, on a GPU)
#
# A variant is `base` or patches joined by `+`:
#   R     every counter signalled with red.relaxed: no release fence on any signal
#   RF    R, and the controller leader runs fence.acq_rel right after barrier A (off the
#         op's path: a signal then releases everything before its instruction)
#   W0    no instruction waits on a counter: the stream runs as fast as the SMs claim it
#   Wq Wa Wo Wg Wd Wl   only the instructions of one opcode wait on no counter (rms_qkv_rope,
#         attention_partial, o_proj_residual, rms_gate_up_silu, down_proj_residual,
#         rms_lm_head): what that one stage boundary costs, at most
#   F<pct> every wait holds once pct% of its target has signalled (rounded up: a wait on
#         one producer still waits for it), as if consumers started on their first inputs
#   G<k>  in each stage but the LM head only blocks 0..k-1, the first claimed, signal the
#         stage's counter (the others a counter nothing waits on): consumers start once the
#         first k producers in claim order are done, the best case of inputs consumed in
#         a fixed order
#   A0    attention_partial does nothing after its barrier (its carried prefetch stays)
#   O0    o_proj_residual does nothing after its barrier
#   P0    no hand-over L2 prefetch (the launch's default prefetch_bytes 0)
#   C0    no carried L2 prefetch
#   S<n>  programs built for n SMs (block sizes and counts), launched on every SM
#   B2    two blocks per SM, each of 7 compute warps and a controller (128 registers a
#         thread still fit): programs built for and launched on 2 x the SMs, so one
#         block's hand-over and tail overlap its sibling's streaming (the math stays right)
# BENCH: scripts/benchmark.py's arguments (default: 1B, 1 and 8 steps per launch).
# REUSE=1: run the builds a call before this one left in $WORK (a warm machine) again.
set -uo pipefail
export MAX_JOBS=${MAX_JOBS:-5} PYTHONUNBUFFERED=1
VARIANTS=${VARIANTS:-"base W0"}
ROUNDS=${ROUNDS:-2}
BENCH=${BENCH:-"--backends megakernel --steps-per-launch 1,8 --repeats 2 --no-fp32-reference"}
WORK=${WORK:-/tmp/structure_bounds}
nvidia-smi --query-gpu=name --format=csv,noheader

patch_tree() {  # patch_tree DIR PATCH
  local d=$1 f=$1/csrc/interpreter.cu
  case $2 in
    base) ;;
    R) sed -i 's/red\.release\.gpu\.global\.add\.u64/red.relaxed.gpu.global.add.u64/' "$f" ;;
    RF) patch_tree "$d" R
        sed -i 's|      if (!go\[slot\]) break;|&\n      if (leader) asm volatile("fence.acq_rel.gpu;" ::: "memory");|' "$f" ;;
    W0) sed -i 's|    if (counter == kNoCounter) continue;|    if (counter == kNoCounter \|\| true) continue;|' "$f" ;;
    W[qaogdl]) declare -A ops=([q]=kOpRmsQkvRope [a]=kOpAttentionPartial [o]=kOpOProjResidual
                              [g]=kOpRmsGateUpSilu [d]=kOpDownProjResidual [l]=kOpRmsLmHead)
        sed -i "s|    if (counter == kNoCounter|& \|\| op == ${ops[${2#W}]}|" "$f" ;;
    F[0-9]*) sed -i "s|    const uint64_t goal = static_cast<uint64_t>(words\[word::kWait0Target + 2 \* w\]) \* p.epoch;|    const uint64_t target = static_cast<uint64_t>(words[word::kWait0Target + 2 * w]);\n    const uint64_t goal = target * (p.epoch - 1) + (target * ${2#F} + 99) / 100;|" "$f" ;;
    G[0-9]*) python3 - "$d/scheduler/program.py" "${2#G}" <<'PY' || return 1
import sys
path, k = sys.argv[1], sys.argv[2]
src = open(path).read()
counter_old = '''        names.append(name)
        targets.append(0)
        return len(names) - 1
'''
counter_new = '''        names.append(name)
        targets.append(0)
        names.append(name + ".late")
        targets.append(0)
        return len(names) - 2
'''
emit_old = '''    def emit(spec, layer: int, waits, signal: int, block_index: int, **args):
'''
emit_new = emit_old + f'''        if block_index >= {k} and spec is not RMS_LM_HEAD:
            signal += 1
'''
assert src.count(counter_old) == 1 and src.count(emit_old) == 1
open(path, "w").write(src.replace(counter_old, counter_new).replace(emit_old, emit_new))
PY
        ;;
    A0) sed -i 's|    case kOpAttentionPartial: return op_attention_partial(ctx);|    case kOpAttentionPartial: return ctx.ready<777>();|' "$f" ;;
    O0) sed -i 's|    case kOpOProjResidual:$|    case kOpOProjResidual: return ctx.ready<778>();|' "$f" ;;
    P0) sed -i 's|kDefaultPrefetchBytes = 64 \* 1024;|kDefaultPrefetchBytes = 0;|' "$d/csrc/launcher.h" ;;
    C0) sed -i 's|  if (end <= begin \|\| begin < 0) return;|  if (true) return;|' "$f" ;;
    S[0-9]*) sed -i "s|            self.num_sms = ext.sm_count()|            self.num_sms = ${2#S}|" \
                 "$d/megakernel/backends/megakernel_backend.py" ;;
    B2) sed -i 's/__launch_bounds__(kThreads, 1)/__launch_bounds__(kThreads, 2)/; s/  const int blocks = num_blocks > 0 ? num_blocks : sms;/  const int blocks = num_blocks > 0 ? num_blocks : 2 * sms;/' "$f"
        sed -i 's/^constexpr int kComputeWarps = 15;/constexpr int kComputeWarps = 7;/' "$d/csrc/common.cuh"
        sed -i 's/^MATVEC_WARPS = 15$/MATVEC_WARPS = 7/' "$d/scheduler/program.py"
        sed -i "s|            self.num_sms = ext.sm_count()|            self.num_sms = 2 * ext.sm_count()|" \
            "$d/megakernel/backends/megakernel_backend.py" ;;
    *) echo "unknown patch $2" >&2; return 1 ;;
  esac
}

for v in $VARIANTS; do
  d=$WORK/$v
  [ "${REUSE:-0}" = 1 ] && [ -d "$d" ] && continue
  rm -rf "$d" && mkdir -p "$d"
  cp -r csrc megakernel scheduler instructions scripts setup.py "$d/"
  (cd "$d/megakernel" && ln -sfn ../scheduler scheduler && ln -sfn ../instructions instructions)
  for p in ${v//+/ }; do patch_tree "$d" "$p" || exit 1; done
  # Every patch must have matched: a sed that finds nothing changes nothing.
  changed=$(diff -r csrc "$d/csrc"; diff megakernel/backends "$d/megakernel/backends"
           diff -r scheduler "$d/scheduler")
  [ "$v" = base ] || [ -n "$changed" ] || { echo "variant $v changed nothing" >&2; exit 1; }
  (cd "$d" && MEGAKERNEL_PROFILE=${PROFILE:-0} python3 setup.py -q build_ext --inplace \
       > build.log 2>&1 || { tail -20 build.log; echo "build failed: $v"; }) &
done
wait
for round in $(seq "$ROUNDS"); do
  for v in $VARIANTS; do
    echo "== $v, round $round"
    (cd "$WORK/$v" && PYTHONPATH=$WORK/$v MEGAKERNEL_GIT_COMMIT=$v python3 scripts/benchmark.py \
         $BENCH ${PROFILE_DIR:+--profile $PROFILE_DIR/$v})
  done
done
