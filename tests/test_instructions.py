"""Instruction encoding: every opcode round-trips through its 32-word record, and the
CUDA header is exactly what the Python definitions generate."""
from __future__ import annotations

import pytest

from megakernel.instructions import (HEADER_FIELDS, HEADER_WORDS, OPCODES, WORDS,
                                     Instruction)
from megakernel.instructions import codegen


@pytest.mark.parametrize("code", sorted(OPCODES))
def test_encode_decode_round_trip(code):
    spec = OPCODES[code]
    args = {name: 1000 + i for i, name in enumerate(spec.args)}
    instr = spec.make(layer=3, waits=((4, 17), (9, 2)), signal=5, token_begin=0,
                      token_count=1, block_index=11, **args)
    words = instr.encode()
    assert len(words) == WORDS
    assert words[HEADER_FIELDS.index("opcode")] == code
    assert Instruction.decode(words) == instr


def test_header_layout_is_fixed():
    assert HEADER_WORDS == len(HEADER_FIELDS) == 10
    assert all(len(spec.args) <= WORDS - HEADER_WORDS for spec in OPCODES.values())
    assert len({spec.name for spec in OPCODES.values()}) == len(OPCODES)


def test_wrong_args_are_refused():
    spec = OPCODES[2]
    with pytest.raises(ValueError):
        Instruction(opcode=2, args={"head": 1}).encode()
    with pytest.raises(ValueError):
        Instruction(opcode=spec.code, waits=((1, 1),) * 3,
                    args={a: 0 for a in spec.args}).encode()


def test_cuda_header_is_generated_from_python():
    assert codegen.HEADER_PATH.read_text() == codegen.generate(), (
        "csrc/instruction_layout.h is stale: run python -m megakernel.instructions.codegen")
