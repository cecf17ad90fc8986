"""The benchmark's read-bandwidth probe (csrc/read_probe.cu): the bytes it reads, and that
its time grows with them as a DRAM stream's does."""
from __future__ import annotations

import statistics

import pytest
import torch

pytestmark = pytest.mark.gpu

CHUNK = 32 * 1024


def _probe_ms(ext, buf, runs: int = 7) -> float:
    times = []
    for _ in range(runs + 1):                    # the first is warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ext.read_probe(buf)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def test_the_probe_reads_whole_chunks_of_every_sm_s_share():
    from megakernel import _C

    sms = _C.sm_count()
    buf = torch.empty((256 << 20) // 4 + 1000, dtype=torch.float32, device="cuda")
    nbytes = buf.numel() * 4
    assert _C.read_probe(buf) == nbytes // sms // CHUNK * CHUNK * sms
    torch.cuda.synchronize()


def test_the_probe_s_time_grows_with_its_bytes():
    """Four times the bytes take 3-5x as long: the probe streams them, it does not skip
    them (a probe that read nothing would time the same at both sizes)."""
    from megakernel import _C

    big = torch.ones((1 << 30) // 4, dtype=torch.float32, device="cuda")
    small = big[: big.numel() // 4]
    ratio = _probe_ms(_C, big) / _probe_ms(_C, small)
    assert 3.0 < ratio < 5.0, ratio


def test_bad_buffers_are_refused_and_the_probe_still_works():
    from megakernel import _C

    with pytest.raises(RuntimeError, match="at least .* bytes"):
        _C.read_probe(torch.empty(1024, dtype=torch.float32, device="cuda"))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _C.read_probe(torch.empty(1 << 20))
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        _C.read_probe(torch.empty(1 << 24, dtype=torch.uint8, device="cuda")[1:])
    assert _C.read_probe(torch.empty(1 << 26, dtype=torch.uint8, device="cuda")) > 0
    torch.cuda.synchronize()
