"""Whether a model's weights and its KV cache fit the memory they go to, checked before
anything is loaded.

Without the check, a max_seq_len too large for the device fails late and badly: on a GPU
with a CUDA out-of-memory traceback after the weights have loaded, on the CPU with the
process killed by the operating system. The estimate counts the two allocations that grow
with the model and with max_seq_len (the matrices and the paged K/V) and a fixed allowance
for the rest: activations, workspaces, the extension's code, programs and prompt graphs.
A load that passes can still run out of memory on a device that other processes fill;
the CLI reports that in one line too.
"""
from __future__ import annotations

import torch

from .errors import InvalidRequestError

GIB = 1 << 30
# What an engine took beyond its weights and cache on an H100, from the driver's free
# count: 0.68 GiB for Llama-3.2-1B (the process's first load, with the extension's code),
# 0.69 for 8B, after a prompt of a long prefill chunk and two short ones, greedy and
# sampled generations and graph captures (scripts/dev/load_overhead.py, benchmarks/
# RESULTS.md entries 91 and 93). About twice that, for headroom.
ALLOWANCE_BYTES = 3 * GIB // 2
MEMINFO = "/proc/meminfo"


def kv_cache_bytes(config, max_seq_len: int, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of PagedKVCache(config, max_seq_len, page_size, dtype): K and V for every
    layer, in whole pages."""
    pages = -(-max_seq_len // page_size)
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return pages * page_size * per_token * _element_size(dtype)


def weight_bytes(config, dtype: torch.dtype, max_positions: int) -> int:
    """Bytes of the loaded Weights: the matrices (a tied embedding once) and the float32
    RoPE tables."""
    rope = 2 * max_positions * (config.head_dim // 2) * 4
    return config.num_parameters() * _element_size(dtype) + rope


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: the CUDA driver's free count, or the
    kernel's MemAvailable for the CPU. None where neither can be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open(MEMINFO) as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_model_fits(config, max_seq_len: int, page_size: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    """Raise InvalidRequestError when the weights plus the KV cache for max_seq_len would
    not fit `device`'s free memory less ALLOWANCE_BYTES, naming the max_seq_len that
    would."""
    free = free_bytes(device)
    if free is None:
        return
    usable = free - ALLOWANCE_BYTES
    weights = weight_bytes(config, dtype, max_seq_len)
    cache = kv_cache_bytes(config, max_seq_len, page_size, dtype)
    if weights + cache <= usable:
        return
    where = (f"{_gib(usable)} GiB usable on {device.type} ({_gib(free)} free, "
             f"{_gib(ALLOWANCE_BYTES)} kept for activations)")
    per_token = kv_cache_bytes(config, page_size, page_size, dtype) // page_size
    fits = max(usable - weights, 0) // per_token // page_size * page_size
    if fits < 2:
        room = (f"more than the {where}" if weights > usable
                else f"which leaves no room for a KV cache in the {where}")
        raise InvalidRequestError(f"the model's weights need {_gib(weights)} GiB in "
                                  f"{_dtype_name(dtype)}, {room}")
    raise InvalidRequestError(
        f"max_seq_len {max_seq_len} needs a {_gib(cache)} GiB KV cache beside "
        f"{_gib(weights)} GiB of weights, more than the {where}: "
        f"use a max_seq_len of at most {fits}")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"
