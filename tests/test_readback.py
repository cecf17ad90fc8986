"""TokenReadback: tokens come back in order, and on the GPU a read waits for the work
before its push only, not for work queued after it."""
from __future__ import annotations

import time

import pytest
import torch

from megakernel.readback import SLOTS, TokenReadback


def test_cpu_tokens_come_back_in_push_order():
    rb = TokenReadback("cpu")
    tickets = [rb.push(torch.tensor(v)) for v in (7, 8, 9)]
    assert [rb.read(t) for t in tickets] == [7, 8, 9]


def test_reads_out_of_order_and_overfull_ring_are_refused():
    rb = TokenReadback("cpu")
    first = rb.push(torch.tensor([1]))
    second = rb.push(torch.tensor([2]))
    with pytest.raises(RuntimeError, match="out of order"):
        rb.read(second)
    assert rb.read(first) == 1
    for v in range(SLOTS - 1):
        rb.push(torch.tensor(v))
    with pytest.raises(RuntimeError, match="at most"):
        rb.push(torch.tensor(0))
    rb.reset()                               # drops the unread ones
    assert rb.read(rb.push(torch.tensor(5))) == 5


def test_a_ticket_of_several_tokens_is_read_whole_and_kept_from_later_writes():
    rb = TokenReadback("cpu")
    written = torch.tensor([4, 5, 6])
    ticket = rb.push(written[-1], host=written)
    written.fill_(0)                         # the next launch reuses the buffer
    assert rb.read_tokens(ticket) == [4, 5, 6]
    with pytest.raises(RuntimeError, match="read_tokens"):
        rb.read(rb.push(torch.tensor(1), host=torch.tensor([1, 2])))


@pytest.mark.gpu
def test_gpu_read_does_not_wait_for_later_work():
    rb = TokenReadback("cuda")
    token = torch.tensor(41, device="cuda") + 1
    ticket = rb.push(token)
    torch.cuda._sleep(2_000_000_000)          # ~1 s of GPU time queued behind the push
    done_later = torch.cuda.Event()
    done_later.record()
    t = time.perf_counter()
    assert rb.read(ticket) == 42
    waited = time.perf_counter() - t
    assert not done_later.query(), "the sleep finished before the read returned"
    assert waited < 0.2
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_push_of_a_host_written_token_copies_nothing():
    # Work queued before the push writes the token into host memory itself (the kernel's
    # mapped result ring; here a copy stands in for it): read() waits for that work and
    # returns the view's value, and the readback's own slot is never written.
    rb = TokenReadback("cuda")
    token = torch.tensor(41, device="cuda") + 1
    written = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    torch.cuda._sleep(200_000_000)            # the write lands well after the push returns
    written.copy_(token.reshape(1), non_blocking=True)
    ticket = rb.push(token, host=written[0])
    assert rb.read(ticket) == 42
    assert int(rb.host[ticket % SLOTS]) == 0


@pytest.mark.gpu
def test_gpu_engine_refuses_work_while_a_launch_outlives_its_bound_then_recovers():
    # After the first token, ~3 s of GPU time are queued ahead of the next decode launch
    # (behind the one already queued), whose readback waits 0.2 s: the read gives up,
    # recovery gives up after 0.2 s more and marks the device hung instead of blocking on
    # it, the next call is refused at once, and once the device is idle the engine decodes
    # as before.
    import megakernel
    from megakernel.errors import DeviceHungError

    engine = megakernel.Engine.from_pretrained("random:tiny", device="cuda", max_seq_len=64)
    expected = engine.generate("Hello", max_new_tokens=20, ignore_eos=True).token_ids
    engine.readback.timeout_s = engine.recover_timeout_s = 0.2
    streamed = []

    def stall_after_first_token(token, piece):
        if not streamed:
            torch.cuda._sleep(6_000_000_000)
        streamed.append(token)

    t = time.perf_counter()
    with pytest.raises(DeviceHungError, match="did not finish"):
        engine.generate("Hello", max_new_tokens=20, ignore_eos=True,
                        stream=stall_after_first_token)
    assert engine.hung and time.perf_counter() - t < 1.5
    assert streamed == expected[:len(streamed)] and 1 <= len(streamed) < 20
    t = time.perf_counter()
    with pytest.raises(DeviceHungError, match="still running"):
        engine.generate("Hello", max_new_tokens=20, ignore_eos=True)
    assert time.perf_counter() - t < 0.1
    torch.cuda.synchronize()
    engine.readback.timeout_s = engine.recover_timeout_s = 10.0
    assert engine.generate("Hello", max_new_tokens=20, ignore_eos=True).token_ids == expected
    assert not engine.hung
