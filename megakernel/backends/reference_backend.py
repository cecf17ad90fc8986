"""The instruction stream interpreted on the CPU with the reference semantics.

Slow and exact (float32): it proves the compiled program (math and dependencies) before
any GPU runs it. Prompt tokens go through the stream one decode step at a time, so every
token this backend produces came from the instruction stream. With order_seed, each step
runs in a seeded random order allowed by the declared dependencies. decode_steps() runs
the chained program of several steps (scheduler/chain.py) as one stream, as the GPU does,
and with `sampling` the program that draws each step's token
(scheduler.with_sampled_tokens).
"""
from __future__ import annotations

import torch

from megakernel.instructions import MachineState, Sampling
from megakernel.scheduler import (allocate_buffers, build_program, chain_steps,
                                  clear_sampling_state, program_kind, run_step,
                                  with_sampled_tokens)

from .base import Backend, StepOutput, StepsOutput, check_step_count

# SM count the reference compiles for by default: small, so programs stay short on a CPU
# while every opcode is still split into several blocks.
DEFAULT_REFERENCE_SMS = 8


class ReferenceBackend(Backend):
    name = "reference"
    chains_sampling = True     # scheduler.with_sampled_tokens: top-k and top-p too

    def __init__(self, weights, kv_cache, num_sms: int = DEFAULT_REFERENCE_SMS,
                 order_seed: int | None = None, program=None, steps_per_launch: int = 1):
        super().__init__(weights, kv_cache)
        check_step_count(steps_per_launch, "steps_per_launch")
        self.order_seed = order_seed
        self.steps_per_launch = steps_per_launch
        self.program = program or build_program(
            self.config, num_sms=num_sms, page_size=kv_cache.page_size,
            max_seq_len=kv_cache.max_seq_len, dtype_bytes=weights.dtype.itemsize)
        self.state = self._state_for(self.program)
        # (steps, None or a with_sampled_tokens kind) -> (program, state)
        self._chains = {(1, None): (self.program, self.state)}

    def _state_for(self, program) -> MachineState:
        return MachineState(
            config=self.config, weights=self.weights,
            buffers=allocate_buffers(program, device=self.kv_cache.device),
            k_cache=self.kv_cache.k, v_cache=self.kv_cache.v,
            page_table=self.kv_cache.page_table, token_ids=torch.zeros(1, dtype=torch.int64),
            positions=torch.zeros(program.num_tokens, dtype=torch.int64),
            counters=torch.zeros(program.num_counters, dtype=torch.int64), epoch=0)

    def reset(self) -> None:
        for _, state in self._chains.values():
            state.counters.zero_()
            state.epoch = 0
            clear_sampling_state(state.buffers)

    def _run(self, steps: int, token_id, position: int,
             sampling: Sampling | None = None) -> MachineState:
        """One launch of the `steps`-step program from token_id at position (sampling: a
        Sampling or its fields, as MachineState.sampling)."""
        kind = program_kind(sampling)
        sampling = None if sampling is None else Sampling(*sampling)
        key = (steps, kind)
        if key not in self._chains:
            step = self.program if kind is None else \
                with_sampled_tokens(self.program, kind)
            program = chain_steps(step, steps)
            self._chains[key] = (program, self._state_for(program))
        program, s = self._chains[key]
        s.sampling = sampling
        s.token_ids[0] = int(token_id)
        s.positions.copy_(torch.arange(position, position + steps))
        s.epoch += 1
        seed = None if self.order_seed is None else self.order_seed * 1_000_003 + s.epoch
        try:
            run_step(program, s, order_seed=seed)
        except Exception:
            self.reset()
            raise
        return s

    def decode(self, token_id: torch.Tensor, position: int) -> StepOutput:
        s = self._run(1, token_id, position)
        return StepOutput(logits=s.buffers["logits"][0],
                          greedy_token=s.buffers["next_token"][0].long())

    def decode_steps(self, token_id, position: int, steps: int,
                     sampling: Sampling | None = None) -> StepsOutput:
        check_step_count(steps, "steps")
        s = self._run(steps, token_id, position, sampling)
        tokens = s.buffers["next_token"].long()
        return StepsOutput(logits=s.buffers["logits"], last_token=tokens[-1],
                           tokens_host=tokens)

    def prefill(self, token_ids: torch.Tensor, start_position: int) -> StepOutput:
        out = None
        for i, token in enumerate(token_ids.tolist()):
            out = self.decode(torch.tensor(token), start_position + i)
        return out
