"""Read a step's token back to the host without waiting for the steps queued after it.

A plain `int(device_tensor)` copies through the current stream and waits for the stream
to drain, so in a pipelined decode loop (launch step i+1, then read step i's token) it
also waits for step i+1: the GPU then idles while the host reacts and launches step i+2
(about 0.1 ms per token on an H100). Here each token is copied into its own pinned host
slot right after the work that produced it, and an event recorded behind the copy is what
the host waits on, so the read covers step i only and step i+1 keeps the GPU busy. A
step that writes its token into host memory itself (StepOutput.greedy_token_host) needs
no copy: push(token, host=view) records only the event; a launch of chained steps that
writes all their tokens (StepsOutput.tokens_host) is read with read_tokens().

    readback = TokenReadback(device)
    ticket = readback.push(token)        # [] int64 on the device; stream ordered, no sync
    ...launch more work...
    value = readback.read(ticket)        # waits for `token` only, bounded by timeout_s
"""
from __future__ import annotations

import time

import torch

from .errors import DeviceHungError

# Tokens that may be pushed and not yet read: the decode loop keeps one step in flight.
SLOTS = 4
DEFAULT_TIMEOUT_S = 60.0


class TokenReadback:
    """A ring of SLOTS pinned host slots (int64) with one CUDA event each; on the CPU,
    push() keeps the value and read() returns it."""

    def __init__(self, device, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.cuda = self.device.type == "cuda"
        self.pushed = 0
        self.read_count = 0
        if self.cuda:
            self.host = torch.zeros(SLOTS, dtype=torch.int64, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(SLOTS)]
            self.sources: list[torch.Tensor | None] = [None] * SLOTS  # push(host=...)
        else:
            self.values: list[torch.Tensor | None] = [None] * SLOTS

    def push(self, token: torch.Tensor, host: torch.Tensor | None = None) -> int:
        """Queue the copy of `token` ([] or [1] integer tensor) to the host; returns the
        ticket to read() it with. At most SLOTS tickets may be pending at once. host: a CPU
        view ([] or [n]) that the work already queued writes the token(s) into (mapped
        memory); then nothing is copied and read() / read_tokens() return the view's values
        once that work is done."""
        if self.pushed - self.read_count >= SLOTS:
            raise RuntimeError(f"TokenReadback holds at most {SLOTS} unread tokens")
        ticket = self.pushed
        slot = ticket % SLOTS
        if self.cuda:
            self.sources[slot] = host
            if host is None:
                self.host[slot:slot + 1].copy_(token.reshape(1), non_blocking=True)
            self.events[slot].record()
        else:
            self.values[slot] = (token if host is None else host).reshape(-1).clone()
        self.pushed += 1
        return ticket

    def read(self, ticket: int) -> int:
        """The value of push()'s `ticket` (one token), as read_tokens()."""
        values = self.read_tokens(ticket)
        if len(values) != 1:
            raise RuntimeError(f"ticket {ticket} holds {len(values)} tokens: use read_tokens()")
        return values[0]

    def read_tokens(self, ticket: int) -> list[int]:
        """The values of push()'s `ticket`, once the work before it has run. Tickets are
        read in order. Raises DeviceHungError (a KernelFaultError) when the device does not
        get there within timeout_s (the kernel's own watchdog normally ends a hung launch
        long before)."""
        if ticket != self.read_count or ticket >= self.pushed:
            raise RuntimeError(f"ticket {ticket} read out of order (next is {self.read_count})")
        slot = ticket % SLOTS
        self.read_count += 1
        if not self.cuda:
            values, self.values[slot] = self.values[slot], None
            return values.tolist()
        wait_or_raise(self.events[slot], self.timeout_s, "a decode step")
        source, self.sources[slot] = self.sources[slot], None
        return (self.host[slot:slot + 1] if source is None else source).reshape(-1).tolist()

    def reset(self) -> None:
        """Forget unread tokens (after an error, once the device is synchronized)."""
        self.read_count = self.pushed


def wait_for_event(event: torch.cuda.Event, timeout_s: float) -> bool:
    """Whether `event` completes within timeout_s (polled: a blocking wait on a device
    that never gets there would never return)."""
    deadline = time.perf_counter() + timeout_s
    while not event.query():
        if time.perf_counter() > deadline:
            return False
    return True


def synchronize_within(device, timeout_s: float) -> bool:
    """torch.cuda.synchronize(device) for the current stream's work, bounded: whether the
    device got through it within timeout_s. True at once on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return wait_for_event(event, timeout_s)


def wait_or_raise(event: torch.cuda.Event, timeout_s: float, what: str) -> None:
    """wait_for_event(), or DeviceHungError: the device did not finish `what` in time."""
    if not wait_for_event(event, timeout_s):
        raise DeviceHungError(f"the device did not finish {what} within {timeout_s:g} s")


def synchronize_or_raise(device, timeout_s: float, what: str) -> None:
    """synchronize_within(), or DeviceHungError: the device did not finish `what` in time."""
    if not synchronize_within(device, timeout_s):
        raise DeviceHungError(f"the device did not finish {what} within {timeout_s:g} s")
