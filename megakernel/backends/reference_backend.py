"""The instruction stream interpreted on the CPU with the reference semantics.

Slow and exact (float32): it proves the compiled program (math and dependencies) before
any GPU runs it. Prompt tokens go through the stream one decode step at a time, so every
token this backend produces came from the instruction stream. With order_seed, each step
runs in a seeded random order allowed by the declared dependencies.
"""
from __future__ import annotations

import torch

from megakernel.instructions import MachineState
from megakernel.scheduler import allocate_buffers, build_program, run_step

from .base import Backend, StepOutput

# SM count the reference compiles for by default: small, so programs stay short on a CPU
# while every opcode is still split into several blocks.
DEFAULT_REFERENCE_SMS = 8


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, weights, kv_cache, num_sms: int = DEFAULT_REFERENCE_SMS,
                 order_seed: int | None = None, program=None):
        super().__init__(weights, kv_cache)
        self.order_seed = order_seed
        self.program = program or build_program(
            self.config, num_sms=num_sms, page_size=kv_cache.page_size,
            max_seq_len=kv_cache.max_seq_len, dtype_bytes=weights.dtype.itemsize)
        self.state = MachineState(
            config=self.config, weights=weights,
            buffers=allocate_buffers(self.program, device=kv_cache.device),
            k_cache=kv_cache.k, v_cache=kv_cache.v, page_table=kv_cache.page_table,
            token_ids=torch.zeros(1, dtype=torch.int64),
            positions=torch.zeros(1, dtype=torch.int64),
            counters=torch.zeros(self.program.num_counters, dtype=torch.int64), epoch=0)

    def reset(self) -> None:
        self.state.counters.zero_()
        self.state.epoch = 0

    def decode(self, token_id: torch.Tensor, position: int) -> StepOutput:
        s = self.state
        s.token_ids[0] = int(token_id)
        s.positions[0] = position
        s.epoch += 1
        seed = None if self.order_seed is None else self.order_seed * 1_000_003 + s.epoch
        try:
            run_step(self.program, s, order_seed=seed)
        except Exception:
            self.reset()
            raise
        logits = s.buffers["logits"][0]
        return StepOutput(logits=logits, greedy_token=s.buffers["next_token"][0].long())

    def prefill(self, token_ids: torch.Tensor, start_position: int) -> StepOutput:
        out = None
        for i, token in enumerate(token_ids.tolist()):
            out = self.decode(torch.tensor(token), start_position + i)
        return out
