"""The host side of a megakernel launch, with a stand-in for the compiled extension: the
step epoch advances only for launches the extension accepted (no GPU needed), and a reset
waits for the device with a bound."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import megakernel.backends.megakernel_backend as megakernel_backend
from megakernel.backends.megakernel_backend import BUFFER_NAMES, KernelState, launch
from megakernel.errors import DeviceHungError

WEIGHT_NAMES = ("embed", "attn_norm", "qkv", "o_proj", "mlp_norm", "gate_up", "down",
                "final_norm", "lm_head", "rope_cos", "rope_sin")


class FakeExtension:
    DEFAULT_PREFETCH_BYTES = 65536

    def __init__(self, refuse: bool):
        self.refuse = refuse
        self.epochs = []

    def launch(self, *args):
        if self.refuse:
            raise RuntimeError("megakernel: prefetch_bytes out of range: 2147483648")
        # ..., epoch, timeout_ns, num_blocks, prefetch_bytes, token_source, token, position,
        # steps, sample_inv_temperature, sample_seed, sample_top_k, sample_top_p, then the
        # sampling buffers
        self.epochs.append(args[-12 - len(megakernel_backend.SAMPLING_BUFFER_NAMES)])


def launch_with(ext, state):
    z = torch.zeros(1)
    launch(ext, z, state, {n: z for n in BUFFER_NAMES},
           SimpleNamespace(**{n: z for n in WEIGHT_NAMES}), z, z, z, z, 1e-5)


def test_refused_launch_leaves_the_epoch():
    z = torch.zeros(4, dtype=torch.int64)
    state = KernelState(z, z, z, torch.zeros(8, dtype=torch.int64), z)
    with pytest.raises(RuntimeError, match="out of range"):
        launch_with(FakeExtension(refuse=True), state)
    assert state.epoch == 0
    ok = FakeExtension(refuse=False)
    launch_with(ok, state)
    launch_with(ok, state)
    assert ok.epochs == [1, 2] and state.epoch == 2


def test_every_buffer_the_launch_passes_is_allocated():
    from megakernel.presets import PRESETS
    from megakernel.scheduler import allocate_buffers, build_program

    program = build_program(PRESETS["tiny"], num_sms=8, page_size=16, max_seq_len=64)
    buffers = allocate_buffers(program, device="cpu", poison=False)
    assert set(BUFFER_NAMES) <= set(buffers), sorted(set(BUFFER_NAMES) - set(buffers))


@pytest.mark.gpu
def test_gpu_reset_while_the_device_stays_busy_raises_instead_of_blocking(monkeypatch):
    # ~1 s of GPU time queued ahead of the reset, whose wait is bounded at 0.1 s: it raises
    # DeviceHungError and clears nothing a running launch could still write; once the
    # device is idle the reset goes through.
    monkeypatch.setattr(megakernel_backend, "HOST_WAIT_TIMEOUT_S", 0.1)
    ones = torch.ones(4, dtype=torch.int64, device="cuda")
    state = KernelState(ones.clone(), ones.clone(), ones.clone(), ones.clone(),
                        torch.ones(8, dtype=torch.int64))
    state.epoch = 3
    torch.cuda._sleep(2_000_000_000)
    with pytest.raises(DeviceHungError, match="the launches before a reset"):
        state.reset()
    assert state.epoch == 3 and int(state.host_status.sum()) == 8
    torch.cuda.synchronize()
    state.reset()
    assert state.epoch == 0 and int(state.counters.sum()) == 0
    assert int(state.host_status.sum()) == 0
