"""The instruction set: one module per opcode, each with its fields, encoding, cost model
and reference semantics in plain torch (the executable specification the CUDA kernel
must match)."""
from .base import (WORDS, HEADER_FIELDS, HEADER_WORDS, L2_PREFETCH_FIELDS, L2_PREFETCH_WORD,
                   MAX_WAITS, NO_COUNTER, OPCODES, Instruction, L2Prefetch, MachineState,
                   OpSpec, ROW_BLOCK_ARGS, Sampling, ScheduleError, row_block_specs)
from .embed import EMBED
from .rms_qkv_rope import RMS_QKV_ROPE
from .attention_partial import ATTENTION_PARTIAL
from .attention_reduce import ATTENTION_REDUCE
from .o_proj_residual import O_PROJ_RESIDUAL
from .rms_gate_up_silu import RMS_GATE_UP_SILU
from .down_proj_residual import DOWN_PROJ_RESIDUAL
from .rms_lm_head import RMS_LM_HEAD
from .argmax_reduce import ARGMAX_REDUCE
from .sample_logits import SAMPLE_LOGITS
from .topk_partial import MAX_TOP_K, TOPK_PARTIAL
from .topk_threshold import TOPK_THRESHOLD
from .topp_histogram import TOPP_HISTOGRAM
from .topp_select import TOPP_SELECT

__all__ = [
    "WORDS", "HEADER_FIELDS", "HEADER_WORDS", "L2_PREFETCH_FIELDS", "L2_PREFETCH_WORD",
    "MAX_WAITS", "NO_COUNTER", "OPCODES", "Instruction", "L2Prefetch", "MachineState",
    "OpSpec", "ROW_BLOCK_ARGS", "Sampling", "ScheduleError", "row_block_specs", "EMBED",
    "RMS_QKV_ROPE", "ATTENTION_PARTIAL", "ATTENTION_REDUCE", "O_PROJ_RESIDUAL",
    "RMS_GATE_UP_SILU", "DOWN_PROJ_RESIDUAL", "RMS_LM_HEAD", "ARGMAX_REDUCE", "SAMPLE_LOGITS",
    "MAX_TOP_K", "TOPK_PARTIAL", "TOPK_THRESHOLD", "TOPP_HISTOGRAM", "TOPP_SELECT",
]
