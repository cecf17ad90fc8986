"""The interface every executor implements; the Engine drives them through it.

A backend owns no sequence state beyond the PagedKVCache it is given: the engine reserves
pages before each call, so a backend never allocates during a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megakernel.errors import InvalidRequestError


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


# Decode steps one launch may chain: the kernel's host result ring holds this many tokens
# per launch (csrc/launcher.h: kMaxLaunchSteps); the reference backend keeps the same.
MAX_STEPS_PER_LAUNCH = 16


def check_step_count(steps, what: str) -> None:
    """InvalidRequestError unless `steps` is an integer in [1, MAX_STEPS_PER_LAUNCH]."""
    if (isinstance(steps, bool) or not isinstance(steps, int)
            or not 1 <= steps <= MAX_STEPS_PER_LAUNCH):
        raise InvalidRequestError(f"{what} must be an integer in [1, {MAX_STEPS_PER_LAUNCH}], "
                                  f"got {steps!r}")


@dataclass
class StepsOutput:
    """What a launch of `steps` chained greedy decode steps leaves behind, on the backend's
    device (valid until the next call): each step's token is the greedy token of the step
    before it.

    logits: [steps, V] float32, one row per step.
    last_token: [] int64, the last step's greedy token (the next launch's input).
    tokens_host: None, or [steps] int64 CPU view of host memory the launch itself writes
    every step's greedy token into, readable once the launch has finished (without it,
    steps is 1 and last_token is the one token).
    """
    logits: torch.Tensor
    last_token: torch.Tensor
    tokens_host: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.logits.shape[0])


class Backend:
    name = "base"
    # Greedy decode steps one decode_steps() call chains by default (Engine.generate).
    steps_per_launch = 1
    # decode_steps(..., sampling=Sampling(inv_temperature, seed, top_k, top_p)) draws each
    # step's token from softmax(logits * inv_temperature) over the top_k largest logits (at
    # most instructions.MAX_TOP_K), the top_p nucleus of those (or all of them) and chains
    # such steps too.
    chains_sampling = False

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

    def decode_steps(self, token_id: torch.Tensor, position: int, steps: int,
                     sampling=None) -> StepsOutput:
        """Greedy decode steps at positions position.., the first from token_id, each later
        one from the greedy token of the step before (or drawn with `sampling`, where
        chains_sampling). Backends that chain steps on the device override this; here one
        greedy step only."""
        if sampling is not None:
            raise InvalidRequestError(f"backend '{self.name}' does not draw tokens on the "
                                      "device")
        if steps != 1:
            raise InvalidRequestError(f"backend '{self.name}' decodes one step per call, "
                                      f"not {steps}")
        out = self.decode(token_id, position)
        host = None if out.greedy_token_host is None else out.greedy_token_host.reshape(1)
        return StepsOutput(logits=out.logits.reshape(1, -1), last_token=out.greedy_token,
                           tokens_host=host)

    # Tokens of the longest dummy prompt warm_up() runs; the engine reserves their pages
    # (0: warm_up() runs nothing).
    warm_up_tokens = 0

    def prompt_positions(self, num_tokens: int) -> int:
        """The position after the last one that a prompt of num_tokens tokens at position
        0 may write K/V to through prefill(): num_tokens, or more where the prompt path
        pads its last chunk. The engine reserves pages up to it where max_seq_len allows
        (beyond that the path must run unpadded)."""
        return num_tokens

    def warm_up(self, num_tokens: int) -> torch.Tensor | None:
        """Run the prompt path on dummy prompts of up to num_tokens tokens at position 0
        (positions [0, num_tokens) have pages reserved by the caller; their K/V is left
        behind), outside any graph bookkeeping, so that a process's first use of the device
        libraries, and of each matmul shape its prompts will use, is paid at load. Returns
        the last prompt's logits [V], or None where nothing ran (nothing here)."""
        return None

    def capture_prompt_graphs(self, keep_positions: int = 0) -> tuple[int, bool]:
        """Capture the CUDA graphs of the prompt chunks that ran without one since the last
        call (prompt_graphs.py). The engine calls it after a generation's last token. A
        capture writes K/V; positions [0, keep_positions) are spared where the cache has
        pages to spare. Returns (graphs captured, whether a capture wrote over those
        positions). Nothing to capture here."""
        return 0, False

    def drop_pending_prompt_graphs(self) -> None:
        """Forget the prompt chunks keyed by their start that ran without a graph since the
        last capture, so that no capture is made for them (the engine calls it after a
        generation that kept a prefix: its chunks start where that prefix ended, a
        position later prompts rarely start at again). Nothing pending here."""

    def prepare(self, sampling=None) -> None:
        """Build ahead whatever decode_steps(..., sampling) will launch, so the first
        launch does not pay for it. Nothing to build here."""

    def check_error(self, greedy_token: int | None = None) -> None:
        """Raise if a finished step failed on the device (greedy_token: the value just
        read back for that step). Backends that fail synchronously need nothing here."""

    def reset(self) -> None:
        """Forget any per-sequence device state (called when the engine starts a new
        sequence or recovers from an error)."""
