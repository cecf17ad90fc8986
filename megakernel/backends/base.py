"""The interface every executor implements; the Engine drives them through it.

A backend owns no sequence state beyond the PagedKVCache it is given: the engine reserves
pages before each call, so a backend never allocates during a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    """What one forward step leaves behind, on the backend's device.

    logits: [V] float32 logits of the last token served (valid until the next call).
    greedy_token: [] int64 argmax of those logits (lowest index among ties).
    greedy_token_host: None, or [] int64 CPU view of host memory the step itself writes
    greedy_token into (the megakernel backend), readable once the step has finished, so
    reading it back needs no device-to-host copy.
    """
    logits: torch.Tensor
    greedy_token: torch.Tensor
    greedy_token_host: torch.Tensor | None = None


class Backend:
    name = "base"

    def __init__(self, weights, kv_cache):
        self.weights = weights
        self.config = weights.config
        self.kv_cache = kv_cache

    def prefill(self, token_ids: torch.Tensor, start_position: int) -> StepOutput:
        """Run tokens [T] int64 at positions start_position.. and append their K/V."""
        raise NotImplementedError

    def decode(self, token_id: torch.Tensor, position: int) -> StepOutput:
        """Run one token ([] int64 on the device) at `position`, appending its K/V."""
        raise NotImplementedError

    def check_error(self, greedy_token: int | None = None) -> None:
        """Raise if a finished step failed on the device (greedy_token: the value just
        read back for that step). Backends that fail synchronously need nothing here."""

    def reset(self) -> None:
        """Forget any per-sequence device state (called when the engine starts a new
        sequence or recovers from an error)."""
