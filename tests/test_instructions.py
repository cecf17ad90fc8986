"""Instruction encoding: every opcode round-trips through its 32-word record, and the
CUDA header is exactly what the Python definitions generate."""
from __future__ import annotations

import pytest

from megakernel.instructions import (HEADER_FIELDS, HEADER_WORDS, L2_PREFETCH_FIELDS,
                                     L2_PREFETCH_WORD, OPCODES, WORDS, Instruction, L2Prefetch,
                                     RMS_GATE_UP_SILU, RMS_QKV_ROPE, row_block_specs)
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


@pytest.mark.parametrize("code", sorted(OPCODES))
def test_l2_prefetch_trailer_round_trips(code):
    # Any opcode may carry the L2 prefetch of a row-block op's weights, in the last words.
    spec = OPCODES[code]
    prefetch = L2Prefetch(RMS_GATE_UP_SILU.code, 7, 128, 63, 32768, 131072, 126976, 225280)
    instr = spec.make(layer=3, waits=((4, 17),), signal=5, token_begin=0, token_count=1,
                      block_index=11, l2_prefetch=prefetch,
                      **{name: 1000 + i for i, name in enumerate(spec.args)})
    words = instr.encode()
    assert words[L2_PREFETCH_WORD:] == [RMS_GATE_UP_SILU.code, 7, 128, 63, 32768, 131072,
                                        126976, 225280]
    assert Instruction.decode(words) == instr
    plain = Instruction.decode(spec.make(layer=3, token_count=1, **{
        name: 1 for name in spec.args}).encode())
    assert plain.l2_prefetch is None


def test_l2_prefetch_names_only_weight_row_ops():
    assert [s.name for s in row_block_specs()] == [
        "o_proj_residual", "rms_gate_up_silu", "down_proj_residual", "rms_lm_head"]
    # One empty range of the two is fine; both empty, no rows or a negative offset is not.
    assert L2Prefetch(RMS_GATE_UP_SILU.code, 0, 0, 4, 0, 0, 16, 1024).words()[-2:] == [16, 1024]
    for bad in (L2Prefetch(RMS_QKV_ROPE.code, 0, 0, 4, 0, 1024),                # not row blocks
                L2Prefetch(RMS_GATE_UP_SILU.code, 0, 0, 4, 1024, 1024),           # empty
                L2Prefetch(RMS_GATE_UP_SILU.code, 0, 0, 4, 1024, 1024, 64, 32),   # empty
                L2Prefetch(RMS_GATE_UP_SILU.code, 0, 0, 0, 0, 1024),              # no rows
                L2Prefetch(RMS_GATE_UP_SILU.code, 0, 0, 4, -16, 1024),
                L2Prefetch(RMS_GATE_UP_SILU.code, 0, 0, 4, 0, 1024, -16, 64)):
        with pytest.raises(ValueError):
            Instruction(opcode=RMS_QKV_ROPE.code, l2_prefetch=bad,
                        args={a: 0 for a in RMS_QKV_ROPE.args}).encode()


def test_header_layout_is_fixed():
    assert HEADER_WORDS == len(HEADER_FIELDS) == 10
    assert L2_PREFETCH_WORD + len(L2_PREFETCH_FIELDS) == WORDS
    assert all(len(spec.args) <= L2_PREFETCH_WORD - HEADER_WORDS for spec in OPCODES.values())
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
