"""Print a SASS listing with each instruction's scheduling control decoded: stall cycles,
the scoreboard it sets when its result is ready (wb) or its operands are read (rb), and
the scoreboards it waits on. RESULTS entry 60 read from it that a mat-vec warp pass puts
all 16 weight loads on one scoreboard, so its first multiply-add waits for every one.

    nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc \\
        -cubin csrc/interpreter.cu -o /tmp/k.cubin
    cuobjdump -sass /tmp/k.cubin > /tmp/k.sass
    python3 scripts/dev/sass_control.py /tmp/k.sass [FIRST_ADDR LAST_ADDR] [--function N]

cuobjdump prints each 128-bit instruction as two 64-bit words; the control field is bits
41-63 of the second (the Volta-and-later layout): 4 bits of stall, 1 of yield, 3 of write
scoreboard, 3 of read scoreboard (7 = none) and a 6-bit wait mask.
"""
import argparse
import re

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;\s*/\* (0x[0-9a-f]+) \*/")
SECOND_WORD = re.compile(r"/\* (0x[0-9a-f]+) \*/")
FUNCTION = re.compile(r"\s*Function : (\S+)")


def decode(control_word: int) -> dict:
    c = control_word >> 41
    return {"stall": c & 0xF, "yield": (c >> 4) & 1, "wb": (c >> 5) & 7, "rb": (c >> 8) & 7,
            "wait": (c >> 11) & 0x3F}


def scoreboard(index: int) -> str:
    return "-" if index == 7 else str(index)


def listing(lines: list[str], function: int):
    """(function name, address, instruction text, control) for the instructions of the
    function-th function of the listing (0-based)."""
    name, index, i = None, -1, 0
    while i < len(lines):
        f = FUNCTION.match(lines[i])
        if f:
            index += 1
            name = f.group(1)
        m = INSTRUCTION.match(lines[i])
        if m and index == function and i + 1 < len(lines):
            second = SECOND_WORD.search(lines[i + 1])
            if second:
                yield name, int(m.group(1), 16), m.group(2), decode(int(second.group(1), 16))
                i += 2
                continue
        i += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sass")
    ap.add_argument("first", nargs="?", default="0", help="first address (hex or decimal)")
    ap.add_argument("last", nargs="?", default=str(1 << 40), help="last address")
    ap.add_argument("--function", type=int, default=0, help="which function (0-based)")
    args = ap.parse_args()
    first, last = int(args.first, 0), int(args.last, 0)
    with open(args.sass) as f:
        lines = f.read().split("\n")
    shown = None
    for name, addr, text, c in listing(lines, args.function):
        if not first <= addr <= last:
            continue
        if name != shown:
            print(name)
            shown = name
        print(f"{addr:05x} stall={c['stall']:2d} wb={scoreboard(c['wb'])} rb={scoreboard(c['rb'])} "
              f"wait={c['wait']:06b}  {text}")


if __name__ == "__main__":
    main()
