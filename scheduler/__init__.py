"""Program building and ordering: compile a decode step into an instruction stream."""
from .program import (BufferSpec, Program, allocate_buffers, attention_partitions,
                      build_program, decode_programs, early_gate_up_limit, split_qkv,
                      split_rows, whole_context_limit)
from .chain import chain_prefix, chain_steps
from .interpreter import check_counters, run_step
from .sampling import clear_sampling_state, program_kind, with_sampled_tokens

__all__ = ["BufferSpec", "Program", "allocate_buffers", "attention_partitions",
           "build_program", "chain_prefix", "chain_steps", "decode_programs",
           "early_gate_up_limit", "split_qkv", "split_rows", "whole_context_limit",
           "check_counters", "run_step", "clear_sampling_state", "program_kind",
           "with_sampled_tokens"]
