"""Where a layer's time goes without the weights' DRAM traffic: writes a copy of the
source tree whose mat-vec weight loads or multiply-adds are replaced (the math is wrong
on purpose; only the time means something). RESULTS entry 46.

    python3 scripts/dev/matvec_bounds.py DEST MODE

MODE
  0  the kernel as it is (the base, built the same way)
  1  every weight read from the first 16 KB of its 2 MB segment (~20 MB, L2-resident),
     no L2 prefetches: the step if the weights came from L2
  2  no weight loads: finite pseudo-random values from the address (six integer ops per
     word), no L2 prefetches
  3  no weight loads: one integer op per word, no L2 prefetches: the multiply-adds alone
  4  no weight loads and no multiply-adds (the warps' passes return zeros): the staging,
     norms, attention, hand-overs and epilogues alone
  5  the real weight loads and L2 prefetches, each loaded word folded in by one XOR
     instead of the multiply-adds: what a free multiply-add would save

Then, in DEST (the extension builds in place; MEGAKERNEL_PROFILE=1 for a profile build):

    ln -s ../scheduler megakernel/scheduler; ln -s ../instructions megakernel/instructions
    python3 setup.py -q build_ext --inplace
    PYTHONPATH=. python3 scripts/benchmark.py --backends megakernel --steps-per-launch 8 \\
        --repeats 2 --no-fp32-reference [--profile DIR]
"""
import pathlib
import shutil
import subprocess
import sys

LOAD_WEIGHT = """__device__ __forceinline__ uint4 load_weight(const uint4* ptr, uint64_t policy) {
  uint4 v;"""
LOAD_WEIGHT_BOUND = """__device__ __forceinline__ uint4 load_weight(const uint4* ptr, uint64_t policy) {
#if MK_BOUND == 1
  {
    const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
    ptr = reinterpret_cast<const uint4*>((a & ~uintptr_t((1u << 21) - 1)) |
                                         (a & uintptr_t((1u << 14) - 1)));
  }
#elif MK_BOUND == 2
  {
    const uint32_t a = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ptr)) ^
                       static_cast<uint32_t>(policy);
    auto w = [](uint32_t s) {
      return 0x3c003c00u | ((s & 1u) << 15) | ((s & 2u) << 30) | ((s >> 2) & 0x007f007fu);
    };
    return make_uint4(w(a >> 4), w(a >> 5), w(a >> 6), w(a >> 7));
  }
#elif MK_BOUND == 3
  {
    const uint32_t a = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ptr)) & 0x00f000f0u;
    const uint32_t w = 0x3c003c00u | a;
    return make_uint4(w, w ^ 0x80008000u, w, w ^ 0x80008000u);
  }
#endif
  uint4 v;"""
WARP_LOAD = "  __device__ __forceinline__ void load(int c0, uint64_t policy) {\n"
WARP_LOAD_BOUND = WARP_LOAD + "    if (MK_BOUND == 4) return;\n"
FINISH = """    const int lane = threadIdx.x % kWarpSize;
    float acc[kRows];"""
FINISH_BOUND = """    const int lane = threadIdx.x % kWarpSize;
    if (MK_BOUND == 4) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) out[r] = 0.0f;
      return;
    }
    if (MK_BOUND == 5) {
      uint32_t h[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) h[r] = 0u;
      for (int c0 = lane; c0 < chunks; c0 += kWarpSize * kMatvecUnroll) {
        if (c0 != lane) load(c0, policy);
#pragma unroll
        for (int u = 0; u < kMatvecUnroll; ++u) {
          if (c0 + u * kWarpSize < chunks) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) h[r] ^= w[r][u].x ^ w[r][u].y ^ w[r][u].z ^ w[r][u].w;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        out[r] = warp_sum(__uint_as_float((h[r] & 0x007fffffu) | 0x3c000000u) - 0.0117f);
      return;
    }
    float acc[kRows];"""
PREFETCH = "__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {\n"
PREFETCH_BOUND = PREFETCH + "  if (MK_BOUND != 0 && MK_BOUND != 5) return;\n"


def patch(path: pathlib.Path, pairs) -> None:
    text = path.read_text()
    for old, new in pairs:
        if text.count(old) != 1:
            raise SystemExit(f"matvec_bounds.py: {path} no longer has the code this patches")
        text = text.replace(old, new)
    path.write_text(text)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[2] not in {"0", "1", "2", "3", "4", "5"}:
        raise SystemExit(__doc__)
    root = pathlib.Path(__file__).resolve().parents[2]
    dest = pathlib.Path(sys.argv[1])
    if dest.exists():
        raise SystemExit(f"matvec_bounds.py: {dest} exists")
    files = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True,
                           text=True).stdout.split()
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    common = dest / "csrc" / "common.cuh"
    patch(common, [(LOAD_WEIGHT, LOAD_WEIGHT_BOUND), (WARP_LOAD, WARP_LOAD_BOUND),
                   (FINISH, FINISH_BOUND)])
    common.write_text(f"#define MK_BOUND {sys.argv[2]}\n" + common.read_text())
    patch(dest / "csrc" / "interpreter.cu", [(PREFETCH, PREFETCH_BOUND)])
    print(f"{dest}: MK_BOUND {sys.argv[2]}")


if __name__ == "__main__":
    main()
