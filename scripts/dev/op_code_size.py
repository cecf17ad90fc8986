"""Machine-code bytes of each op in the megakernel, without a GPU (needs nvcc).

    python3 scripts/dev/op_code_size.py [--profile]

Compiles csrc/interpreter.cu to a cubin as setup.py does, then once more per opcode with
that op's call in run_op() replaced by a bare ready(): the drop in the kernel's .text is
the op's code (every template instance of it). Every SM runs each op once per layer, so
this is roughly the instruction bytes an SM fetches anew per op (benchmarks/RESULTS.md,
entry 8)."""
from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
              "-cubin"]
OP_CALL = re.compile(r"case (k\w+): return (op_\w+)\(ctx\);")


def kernel_text_bytes(cubin: bytes) -> int:
    """Size of the megakernel's .text section in an ELF64 cubin."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize)
               for i in range(count)]
    names_at = headers[names_index][4]
    for name_off, *_, size, _, _, _, _ in headers:
        end = cubin.index(b"\0", names_at + name_off)
        name = cubin[names_at + name_off:end].decode()
        if name.startswith(".text.") and "megakernel" in name:
            return size
    raise RuntimeError("no megakernel .text section in the cubin")


def compile_size(src_dir: Path, extra: list[str]) -> int:
    out = src_dir / "kernel.cubin"
    subprocess.run(["nvcc", *NVCC_FLAGS, *extra, f"-I{src_dir}", str(src_dir / "interpreter.cu"),
                    "-o", str(out)], check=True)
    return kernel_text_bytes(out.read_bytes())


def size_without(op: str | None, work: Path, extra: list[str]) -> int:
    """.text bytes of the kernel with `op`'s call stubbed out (None: as it is)."""
    tree = work / (op or "full")
    shutil.copytree(CSRC, tree)
    if op is not None:
        source = tree / "interpreter.cu"
        text = source.read_text()
        stubbed = re.sub(rf"case (k\w+): return {op}\(ctx\);",
                         r"case \1: return ctx.ready<kOpNone>();", text)
        assert stubbed != text, op
        source.write_text(stubbed)
    return compile_size(tree, extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="the MEGAKERNEL_PROFILE=1 build")
    args = parser.parse_args()
    if shutil.which("nvcc") is None:
        print("op_code_size: nvcc not found", file=sys.stderr)
        return 1
    extra = ["-DMEGAKERNEL_PROFILE=1"] if args.profile else []
    ops = [m.group(2) for m in OP_CALL.finditer((CSRC / "interpreter.cu").read_text())]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor() as pool:
        sizes = dict(zip([None, *ops], pool.map(lambda op: size_without(op, Path(tmp), extra),
                                                [None, *ops])))
    total = sizes.pop(None)
    print(f"{'op':<24} {'KB':>6}")
    for op, without in sizes.items():
        print(f"{op:<24} {(total - without) / 1024:>6.1f}")
    print(f"{'kernel .text':<24} {total / 1024:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
