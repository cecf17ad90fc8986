"""The persistent kernel on a GPU: every instruction alone against its reference semantics
(float32 on the CPU, the same bf16 weights upcast) at odd sizes, whole decode steps
against the reference interpreter, bit-identical repeats, and the watchdog."""
from __future__ import annotations

import time

import pytest
import torch

from megakernel.config import ModelConfig
from megakernel.errors import KernelFaultError
from megakernel.instructions import (ARGMAX_REDUCE, ATTENTION_PARTIAL, ATTENTION_REDUCE,
                                     DOWN_PROJ_RESIDUAL, EMBED, O_PROJ_RESIDUAL,
                                     RMS_GATE_UP_SILU, RMS_LM_HEAD, RMS_QKV_ROPE, SAMPLE_LOGITS,
                                     MAX_TOP_K, TOPK_PARTIAL, TOPK_THRESHOLD, TOPP_HISTOGRAM,
                                     TOPP_SELECT, MachineState, Sampling)
from megakernel.instructions.base import gumbel_noise
from megakernel.kv_cache import PagedKVCache
from megakernel.presets import random_weights
from megakernel.scheduler import Program, allocate_buffers, build_program, run_step
from tolerances import RELATIVE_TOLERANCE, relative_error

pytestmark = pytest.mark.gpu

TOL = RELATIVE_TOLERANCE[torch.bfloat16]
PAGE_SIZE = 16
MAX_SEQ = 256
LAYER = 1                      # ops run on layer 1, so the layer stride is exercised

# Odd sizes: hidden 384, intermediate 1000, vocab 1003; GQA 4 with head_dim 64, GQA 8
# with head_dim 128, GQA 3 with head_dim 128 (attention pads the group to 4 heads).
CONFIGS = {
    "hd64-gqa4": dict(num_heads=8, num_kv_heads=2, head_dim=64),
    "hd128-gqa8": dict(num_heads=8, num_kv_heads=1, head_dim=128),
    "hd128-gqa3": dict(num_heads=6, num_kv_heads=2, head_dim=128),
}


def odd_config(num_heads, num_kv_heads, head_dim, hidden_size=384) -> ModelConfig:
    return ModelConfig(vocab_size=1003, hidden_size=hidden_size, intermediate_size=1000,
                       num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096)


def make_weights(cfg, seed, max_seq=MAX_SEQ):
    """bf16 weights on the GPU and the same values on the CPU."""
    gpu = random_weights(cfg, seed=seed, dtype=torch.bfloat16, device="cuda",
                         max_positions=max_seq, init_std=0.05)
    return gpu, gpu.to("cpu")


def make_caches(cfg, context: int, reserve: int, seed: int, max_seq: int = MAX_SEQ):
    """CPU and GPU paged caches with identical shuffled page tables, NaN in every unused
    slot and random K/V at positions [0, context)."""
    caches = [PagedKVCache(cfg, max_seq, PAGE_SIZE, dtype=torch.bfloat16, device=d,
                           shuffle_seed=seed, poison=True) for d in ("cpu", "cuda")]
    for c in caches:
        c.reserve(reserve)
    cpu, gpu = caches
    assert torch.equal(cpu.page_table, gpu.page_table.cpu())
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(context)
    pages = cpu.page_table[0, pos // PAGE_SIZE].long()
    shape = (cfg.num_layers, context, cfg.num_kv_heads, cfg.head_dim)
    cpu.k[:, pages, pos % PAGE_SIZE] = torch.randn(shape, generator=gen).to(torch.bfloat16)
    cpu.v[:, pages, pos % PAGE_SIZE] = torch.randn(shape, generator=gen).to(torch.bfloat16)
    gpu.k.copy_(cpu.k)
    gpu.v.copy_(cpu.v)
    return cpu, gpu


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL):
    """Same NaN and infinity pattern; relative error of the finite values within tol."""
    got, ref = got.detach().cpu().float(), ref.detach().float()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN pattern differs"
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf_ref), f"{what}: infinity pattern differs"
    assert torch.equal(got[inf_ref], ref[inf_ref]), f"{what}: infinity signs differ"
    finite = torch.isfinite(ref)
    err = relative_error(got[finite], ref[finite])
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def make(spec, block_index=0, token_count=1, waits=(), **args):
    return spec.make(layer=LAYER if spec in LAYERED else 0, waits=waits, signal=0,
                     token_begin=0, token_count=token_count, block_index=block_index, **args)


LAYERED = (RMS_QKV_ROPE, ATTENTION_PARTIAL, O_PROJ_RESIDUAL, RMS_GATE_UP_SILU,
           DOWN_PROJ_RESIDUAL)


class OpCase:
    """One model, a CPU MachineState (the reference) and the same state on the GPU."""

    def __init__(self, cfg_name: str, position: int = 37, token: int = 1002, seed: int = 0,
                 num_sms: int = 8, max_seq: int = MAX_SEQ, hidden_size: int = 384):
        from megakernel.backends.megakernel_backend import run_program

        self.run_program = run_program
        self.cfg = cfg = odd_config(**CONFIGS[cfg_name], hidden_size=hidden_size)
        self.w_gpu, self.w_cpu = make_weights(cfg, seed, max_seq)
        self.program = build_program(cfg, num_sms=num_sms, page_size=PAGE_SIZE,
                                     max_seq_len=max_seq)
        self.position, self.token = position, token
        self.cache_cpu, self.cache_gpu = make_caches(cfg, position, position + 1, seed + 1,
                                                     max_seq)
        gen = torch.Generator().manual_seed(seed + 2)
        buffers = allocate_buffers(self.program, poison=True)
        for name in ("hidden", "q", "attn_out", "mlp_act", "attn_partial_out"):
            buffers[name].copy_(torch.randn(buffers[name].shape, generator=gen))
        buffers["attn_partial_lse"].copy_(torch.randn(buffers["attn_partial_lse"].shape,
                                                      generator=gen))
        self.cpu = MachineState(
            config=cfg, weights=self.w_cpu, buffers=buffers, k_cache=self.cache_cpu.k,
            v_cache=self.cache_cpu.v, page_table=self.cache_cpu.page_table,
            token_ids=torch.tensor([token]), positions=torch.tensor([position]),
            counters=torch.zeros(1, dtype=torch.int64), epoch=1)
        self.sync_inputs()

    def sync_inputs(self):
        """Copy the CPU buffers (after a test edited them) to the GPU."""
        self.gpu = {k: v.to("cuda") for k, v in self.cpu.buffers.items()}

    def run(self, instrs):
        for instr in instrs:
            instr.spec.reference(instr, self.cpu)
        self.run_program(instrs, weights=self.w_gpu, buffers=self.gpu,
                         k_cache=self.cache_gpu.k, v_cache=self.cache_gpu.v,
                         page_table=self.cache_gpu.page_table, token_ids=[self.token],
                         positions=[self.position], num_counters=1,
                         sampling=self.cpu.sampling)
        torch.cuda.synchronize()

    def check(self, *names, kv: bool = False):
        for name in names:
            if self.gpu[name].dtype.is_floating_point:
                assert_close(self.gpu[name], self.cpu.buffers[name], name)
            else:
                assert torch.equal(self.gpu[name].cpu(), self.cpu.buffers[name]), name
        if kv:
            assert_close(self.cache_gpu.k, self.cache_cpu.k, "k_cache")
            assert_close(self.cache_gpu.v, self.cache_cpu.v, "v_cache")


# ---------------------------------------------------------------------------------------
# Each instruction alone.

@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("token", [0, 7, 1002])
def test_embed(cfg_name, token):
    case = OpCase(cfg_name, token=token)
    case.run([make(EMBED)])
    case.check("hidden")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("position", [0, 37, 255])
@pytest.mark.parametrize("spanning", [False, True])
def test_rms_qkv_rope(cfg_name, position, spanning):
    case = OpCase(cfg_name, position=position)
    cfg = case.cfg
    half = cfg.head_dim // 2
    heads = cfg.num_heads + 2 * cfg.num_kv_heads
    if spanning:   # blocks of odd sizes that run on into the next heads (up to head_dim)
        sizes, blocks, g = (7, half + 9, 1, cfg.head_dim), [], 0
        while g < heads * half:
            n = min(sizes[len(blocks) % len(sizes)], heads * half - g)
            blocks.append((g // half, g % half, n))
            g += n
    else:          # within each head, odd pair counts
        blocks = [(h, p0, n) for h in range(heads) for p0, n in ((0, 5), (5, half - 5))]
    instrs = [make(RMS_QKV_ROPE, b, head=h, pair_begin=p0, pair_count=n)
              for b, (h, p0, n) in enumerate(blocks)]
    case.run(instrs)
    case.check("q", kv=True)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("position,max_seq,partitions", [
    (0, MAX_SEQ, None), (15, MAX_SEQ, None), (16, MAX_SEQ, None), (100, MAX_SEQ, None),
    (255, MAX_SEQ, None),
    # On either side of the tensor-core path's threshold (kAttnMmaMinTokens, 64 tokens):
    # 3-page and 4-page partitions.
    (191, MAX_SEQ, 4), (192, MAX_SEQ, 4),
    # Long partitions: each warp's K/V ring wraps several times, the token's own row lands
    # in a chunk copied after the wait.
    (1000, 1024, None), (1000, 1024, 1), (1023, 1024, 3)])
def test_attention_partial(cfg_name, position, max_seq, partitions):
    case = attention_case(cfg_name, position, max_seq)
    cfg = case.cfg
    P = partitions or case.program.attn_partitions
    instrs = [make(ATTENTION_PARTIAL, b, kv_head=kvh, partition=p, num_partitions=P,
                   head_begin=0, head_count=cfg.group_size, dim_begin=0,
                   dim_count=cfg.head_dim)
              for b, (kvh, p) in enumerate((kvh, p) for kvh in range(cfg.num_kv_heads)
                                           for p in range(P))]
    case.run(instrs)
    # One partition is the whole context: the heads' attention, straight into attn_out.
    case.check(*(("attn_out",) if P == 1 else ("attn_partial_out", "attn_partial_lse")))


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("position", [0, 37, 100, 255])
@pytest.mark.parametrize("partitions", [1, 3])
def test_attention_partial_head_and_dim_slices(cfg_name, position, partitions):
    # Instructions that each publish some heads of the group and a slice of their dims, as
    # whole-context programs emit them (one head, 16- or 32-dim slices), here at odd sizes:
    # together they cover every head and dim once.
    case = attention_case(cfg_name, position, MAX_SEQ)
    cfg, P = case.cfg, partitions
    hd = cfg.head_dim
    slices = [(0, 1, 0, 16), (0, 1, 16, hd - 16), (1, cfg.group_size - 1, 0, 48),
              (1, cfg.group_size - 1, 48, hd - 48)]
    instrs = [make(ATTENTION_PARTIAL, b, kv_head=kvh, partition=p, num_partitions=P,
                   head_begin=h0, head_count=nh, dim_begin=d0, dim_count=nd)
              for b, (kvh, p, (h0, nh, d0, nd)) in enumerate(
                  (kvh, p, sl) for kvh in range(cfg.num_kv_heads) for p in range(P)
                  for sl in slices)]
    case.run(instrs)
    case.check(*(("attn_out",) if P == 1 else ("attn_partial_out", "attn_partial_lse")))


def attention_case(cfg_name: str, position: int, max_seq: int) -> OpCase:
    """An OpCase whose cache also holds the token's own K/V row (written by rms_qkv_rope
    in a real step)."""
    case = OpCase(cfg_name, position=position, max_seq=max_seq)
    cfg = case.cfg
    page = int(case.cache_cpu.page_table[0, position // PAGE_SIZE])
    gen = torch.Generator().manual_seed(5)
    for cache_cpu, cache_gpu in ((case.cache_cpu.k, case.cache_gpu.k),
                                 (case.cache_cpu.v, case.cache_gpu.v)):
        cache_cpu[:, page, position % PAGE_SIZE] = torch.randn(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(torch.bfloat16)
        cache_gpu.copy_(cache_cpu)
    return case


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_attention_reduce(cfg_name):
    case = OpCase(cfg_name)
    cfg, P = case.cfg, case.program.attn_partitions
    # Later partitions empty for some heads (out 0, lse -inf), as short contexts leave them.
    lse = case.cpu.buffers["attn_partial_lse"]
    out = case.cpu.buffers["attn_partial_out"]
    lse[:, ::2, P // 2 + 1:] = float("-inf")
    out[:, ::2, P // 2 + 1:] = 0.0
    case.sync_inputs()
    nq = cfg.num_heads
    groups = [(0, 1), (1, 3), (4, nq - 4)]
    instrs = [make(ATTENTION_REDUCE, b, head_begin=h0, head_count=n, num_partitions=P)
              for b, (h0, n) in enumerate(groups)]
    case.run(instrs)
    case.check("attn_out")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_o_proj_residual(cfg_name):
    case = OpCase(cfg_name)
    blocks = [(0, 1), (1, 50), (51, 333)]               # hidden 384
    case.run([make(O_PROJ_RESIDUAL, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.check("hidden")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_rms_gate_up_silu(cfg_name):
    case = OpCase(cfg_name)
    blocks = [(0, 7), (7, 500), (507, 493)]             # intermediate 1000
    case.run([make(RMS_GATE_UP_SILU, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.check("mlp_act")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_down_proj_residual(cfg_name):
    case = OpCase(cfg_name)
    blocks = [(0, 100), (100, 284)]
    case.run([make(DOWN_PROJ_RESIDUAL, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.check("hidden")


@pytest.mark.parametrize("spec", [O_PROJ_RESIDUAL, DOWN_PROJ_RESIDUAL])
@pytest.mark.parametrize("sizes", [list(range(1, 28)) + [6],            # hidden 384
                                   [28, 29, 30, 31, 59, 60, 61, 86]])
def test_row_pair_blocks_every_last_round_size(spec, sizes):
    """A block's rows go to the warps in rounds of 30, two to a warp; a last, partial round
    of m rows pairs them ceil(m / 2) apart (csrc/common.cuh, RowPairs). These blocks end in
    every m from 1 to 30, after zero, one or two full rounds. Each row's update is checked on
    its own: a row left out or done twice is a small part of the whole tensor's error."""
    case = OpCase("hd64-gqa4")
    assert sum(sizes) == case.cfg.hidden_size
    before = case.cpu.buffers["hidden"].clone()
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    case.run([make(spec, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(zip(starts, sizes))])
    want = case.cpu.buffers["hidden"] - before
    got = case.gpu["hidden"].cpu() - before
    scale = want.abs().mean()
    bad = ((got - want).abs() > 1e-3 * (want.abs() + scale)).any(dim=0).nonzero().flatten()
    assert bad.numel() == 0, f"rows {bad.tolist()[:10]} differ"


@pytest.mark.parametrize("spec", [O_PROJ_RESIDUAL, DOWN_PROJ_RESIDUAL])
def test_row_pair_block_of_more_rows_than_threads(spec):
    """The residual rows of an o_proj or down block: one per compute thread is loaded
    before the input vector's copies and stored after them; rows past the 480 threads
    (blocks this wide run where an 8B model meets a GPU of a few SMs) loop after that.
    One block of all 1000 rows of a wider model, and one of 481 beside one of 519."""
    for blocks in ([(0, 1000)], [(0, 481), (481, 519)]):
        case = OpCase("hd64-gqa4", hidden_size=1000)
        case.run([make(spec, b, row_begin=r0, row_count=n)
                  for b, (r0, n) in enumerate(blocks)])
        case.check("hidden")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_rms_lm_head_and_argmax(cfg_name):
    case = OpCase(cfg_name)
    blocks = [(0, 1), (1, 500), (501, 502)]             # vocab 1003
    assert len(blocks) <= case.program.lm_head_blocks
    case.run([make(RMS_LM_HEAD, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.check("logits")
    nb = len(blocks)
    assert_close(case.gpu["argmax_value"][:, :nb], case.cpu.buffers["argmax_value"][:, :nb],
                 "argmax_value")
    logits = case.cpu.buffers["logits"][0]
    for b, (r0, n) in enumerate(blocks):
        got = int(case.gpu["argmax_index"][0, b])
        want = int(case.cpu.buffers["argmax_index"][0, b])
        # Equal, unless two logits of the block are within rounding of each other.
        assert r0 <= got < r0 + n
        assert got == want or logits[got] >= logits[want] - 1e-5 * logits.abs().max()
    case.run([make(ARGMAX_REDUCE, num_blocks=nb)])
    got = int(case.gpu["next_token"][0])
    assert got == int(torch.argmax(case.gpu["logits"][0]).item())


@pytest.mark.parametrize("sampling", [None, Sampling(1 / 0.7, 2 ** 62 + 12345),
                                      Sampling(3.0, 7)])
def test_sample_logits_and_argmax(sampling):
    """After the LM head, each sample_logits block leaves in its slot the best of its rows'
    logit * inv_temperature + the hashed noise, with its score (without sampling, the
    greedy kernel runs none of the op: the LM head's partial argmax stays, which is what
    the op computes then); argmax_reduce then picks the best of the vocabulary."""
    case = OpCase("hd64-gqa4")
    case.cpu.sampling = sampling
    blocks = [(0, 1), (1, 500), (501, 502)]             # vocab 1003
    nb = len(blocks)
    case.run([make(RMS_LM_HEAD, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.run([make(SAMPLE_LOGITS, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.run([make(ARGMAX_REDUCE, num_blocks=nb)])
    scores = case.gpu["logits"][0].cpu()
    if sampling is not None:
        scores = scores * sampling.inv_temperature + gumbel_noise(
            sampling.seed, case.position, torch.arange(len(scores)))
    slack = 1e-5 * scores.abs().max()      # the kernel's logf is the fast one
    for b, (r0, n) in enumerate(blocks):
        got = int(case.gpu["argmax_index"][0, b])
        assert r0 <= got < r0 + n
        assert scores[got] >= scores[r0:r0 + n].max() - slack
        assert abs(float(case.gpu["argmax_value"][0, b]) - float(scores[got])) <= slack
    got, want = int(case.gpu["next_token"][0]), int(case.cpu.buffers["next_token"][0])
    assert scores[got] >= scores.max() - slack
    # The reference's token, unless its logits (float32 on the CPU) put another near tie first.
    assert got == want or scores[got] - scores[want] <= 2 * TOL * scores.abs().max()


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (7, 1.0), (64, 1.0), (7, 0.5), (64, 0.9)])
def test_top_k_stages_and_the_draw(top_k, top_p):
    """topk_partial leaves each block's k largest logits (ties repeated, -inf past a short
    block's rows) and the tied rows they leave out, topk_threshold the k-th largest of the
    vocabulary (with top_p < 1, the reference's nucleus among the top k), and the draw
    that follows is among the logits at or above it. The logits hold ties at the k-th
    largest."""
    case = OpCase("hd64-gqa4")
    case.cpu.sampling = Sampling(1 / 0.8, 99, top_k, top_p)
    V = case.cfg.vocab_size
    gen = torch.Generator().manual_seed(top_k)
    logits = (4 * torch.randn(1, V, generator=gen)).round(decimals=1)   # many ties
    case.cpu.buffers["logits"].copy_(logits)
    blocks = [(0, 3), (3, 500), (503, 500)]             # vocab 1003; the first block short
    case.cpu.buffers["topk_values"] = torch.full((1, case.program.lm_head_blocks * MAX_TOP_K),
                                                 float("nan"))
    case.cpu.buffers["topk_ties"] = torch.full((1, case.program.lm_head_blocks), -7,
                                               dtype=torch.int32)
    case.cpu.buffers["sample_threshold"] = torch.full((1,), float("nan"))
    case.sync_inputs()
    case.run([make(TOPK_PARTIAL, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    for b in range(len(blocks)):
        got = case.gpu["topk_values"][0, b * MAX_TOP_K:b * MAX_TOP_K + top_k].cpu()
        want = case.cpu.buffers["topk_values"][0, b * MAX_TOP_K:b * MAX_TOP_K + top_k]
        assert torch.equal(got.sort().values, want.sort().values), b
    assert torch.equal(case.gpu["topk_ties"][0, :len(blocks)].cpu(),
                       case.cpu.buffers["topk_ties"][0, :len(blocks)])
    case.run([make(TOPK_THRESHOLD, num_blocks=len(blocks))])
    threshold = float(case.gpu["sample_threshold"][0])
    assert threshold == float(case.cpu.buffers["sample_threshold"][0])
    kth = float(torch.topk(logits[0], top_k).values[-1])
    assert threshold == kth if top_p == 1.0 else threshold >= kth
    case.run([make(SAMPLE_LOGITS, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.run([make(ARGMAX_REDUCE, num_blocks=len(blocks))])
    got, want = int(case.gpu["next_token"][0]), int(case.cpu.buffers["next_token"][0])
    assert logits[0, got] >= threshold
    scores = logits[0] * (1 / 0.8) + gumbel_noise(99, case.position, torch.arange(V))
    scores = scores.masked_fill(logits[0] < threshold, float("-inf"))
    assert got == want or scores[got] >= scores.max() - 1e-5 * scores.abs().max()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.6, 0.5), (1.5, 0.99)])
def test_top_p_stages_and_the_draw(temperature, top_p):
    """The four passes of topp_histogram and topp_select leave the nucleus threshold of
    the reference semantics (which keeps the tokens sampling.masked_scores keeps), each
    pass the same histogram up to the fast exponential's rounding, cleared after its
    select, and the draw that follows is in the nucleus."""
    from megakernel.sampling import masked_scores

    case = OpCase("hd64-gqa4")
    case.cpu.sampling = Sampling(1 / temperature, 5, 0, top_p)
    V = case.cfg.vocab_size
    logits = 3 * torch.randn(1, V, generator=torch.Generator().manual_seed(int(top_p * 100)))
    case.cpu.buffers["logits"].copy_(logits)
    blocks = [(0, 3), (3, 500), (503, 500)]             # vocab 1003
    # The LM head's partial maxima, which the histograms read.
    case.cpu.buffers["argmax_value"].fill_(float("-inf"))
    for b, (r0, n) in enumerate(blocks):
        case.cpu.buffers["argmax_value"][0, b] = logits[0, r0:r0 + n].max()
    for name, shape, dtype in (("topp_hist", (1, 4 * 256), torch.int64),
                               ("topp_state", (1, 4), torch.float64),
                               ("sample_threshold", (1,), torch.float32)):
        case.cpu.buffers[name] = torch.zeros(shape, dtype=dtype)
    case.sync_inputs()
    for pass_index in range(4):
        bins = slice(pass_index * 256, (pass_index + 1) * 256)
        case.run([make(TOPP_HISTOGRAM, b, row_begin=r0, row_count=n, pass_index=pass_index)
                  for b, (r0, n) in enumerate(blocks)])
        got = case.gpu["topp_hist"][0, bins].cpu().double()
        want = case.cpu.buffers["topp_hist"][0, bins].double()
        assert (got - want).abs().max() <= 1e-5 * max(float(want.sum()), 2 ** 32), pass_index
        case.cpu.buffers["topp_hist"][0, bins] = case.gpu["topp_hist"][0, bins].cpu()
        case.run([make(TOPP_SELECT, pass_index=pass_index)])
        assert not case.gpu["topp_hist"][0, bins].any()
    threshold = float(case.gpu["sample_threshold"][0])
    assert threshold == float(case.cpu.buffers["sample_threshold"][0])
    nucleus = masked_scores(logits[0], temperature, 0, top_p) > float("-inf")
    assert torch.equal(logits[0] >= threshold, nucleus)
    case.run([make(SAMPLE_LOGITS, b, row_begin=r0, row_count=n)
              for b, (r0, n) in enumerate(blocks)])
    case.run([make(ARGMAX_REDUCE, num_blocks=len(blocks))])
    assert nucleus[int(case.gpu["next_token"][0])]


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_argmax_reduce_ties_pick_lowest_index(cfg_name):
    case = OpCase(cfg_name)
    nb = case.program.lm_head_blocks
    values = torch.randn(1, nb)
    values[0, [1, nb - 1]] = 10.0                  # a tie for the maximum
    indices = torch.arange(nb, dtype=torch.int32).flip(0).unsqueeze(0) * 3
    case.cpu.buffers["argmax_value"].copy_(values)
    case.cpu.buffers["argmax_index"].copy_(indices)
    case.sync_inputs()
    case.run([make(ARGMAX_REDUCE, num_blocks=nb)])
    case.check("next_token")
    assert int(case.gpu["next_token"][0]) == int(indices[0, nb - 1])


# ---------------------------------------------------------------------------------------
# Refusals and the watchdog on hand-made programs.

def test_refuses_multi_token_instruction():
    case = OpCase("hd64-gqa4")
    with pytest.raises(KernelFaultError) as e:
        case.run_program([make(EMBED, token_count=2)], weights=case.w_gpu, buffers=case.gpu,
                         k_cache=case.cache_gpu.k, v_cache=case.cache_gpu.v,
                         page_table=case.cache_gpu.page_table, token_ids=[1],
                         positions=[0], num_counters=1)
    assert e.value.record["kind"] == "unsupported_tokens"
    assert e.value.record["opcode_name"] == "embed"


def test_refuses_token_outside_vocab():
    case = OpCase("hd64-gqa4")
    with pytest.raises(KernelFaultError) as e:
        case.run_program([make(EMBED)], weights=case.w_gpu, buffers=case.gpu,
                         k_cache=case.cache_gpu.k, v_cache=case.cache_gpu.v,
                         page_table=case.cache_gpu.page_table, token_ids=[1003],
                         positions=[0], num_counters=1)
    assert e.value.record["kind"] == "bad_token"
    assert e.value.record["seen"] == 1003


def test_watchdog_on_hand_made_program():
    case = OpCase("hd64-gqa4")
    # The second instruction waits for a signal nobody sends.
    instrs = [make(EMBED), make(O_PROJ_RESIDUAL, waits=((0, 5),), row_begin=0, row_count=8)]
    t0 = time.perf_counter()
    with pytest.raises(KernelFaultError) as e:
        case.run_program(instrs, weights=case.w_gpu, buffers=case.gpu,
                         k_cache=case.cache_gpu.k, v_cache=case.cache_gpu.v,
                         page_table=case.cache_gpu.page_table, token_ids=[1], positions=[0],
                         num_counters=1, timeout_s=0.2)
    assert time.perf_counter() - t0 < 5.0
    rec = e.value.record
    assert rec["kind"] == "timeout" and rec["instruction"] == 1
    assert rec["opcode_name"] == "o_proj_residual" and rec["layer"] == LAYER
    assert rec["counter"] == 0 and rec["seen"] == 1 and rec["target"] == 5
    assert rec["root"]["instruction"] == 1


# ---------------------------------------------------------------------------------------
# Whole decode steps through MegakernelBackend.

def make_backend_case(cfg_name, seed=0, context=40, steps=6, **backend_kw):
    from megakernel.backends.megakernel_backend import MegakernelBackend

    cfg = odd_config(**CONFIGS[cfg_name])
    w_gpu, w_cpu = make_weights(cfg, seed)
    cache_cpu, cache_gpu = make_caches(cfg, context, context + steps + 1, seed + 1)
    backend = MegakernelBackend(w_gpu, cache_gpu, max_seq_len=MAX_SEQ, **backend_kw)
    return cfg, w_cpu, cache_cpu, cache_gpu, backend


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_decode_steps_match_reference_interpreter(cfg_name):
    context, steps = 40, 6
    cfg, w_cpu, cache_cpu, cache_gpu, backend = make_backend_case(cfg_name, context=context,
                                                                  steps=steps)
    program = backend.program
    assert program.num_sms == torch.cuda.get_device_properties(0).multi_processor_count
    ref = MachineState(config=cfg, weights=w_cpu, buffers=allocate_buffers(program, poison=True),
                       k_cache=cache_cpu.k, v_cache=cache_cpu.v,
                       page_table=cache_cpu.page_table, token_ids=torch.tensor([0]),
                       positions=torch.tensor([0]),
                       counters=torch.zeros(program.num_counters, dtype=torch.int64), epoch=0)
    token = 17
    for step in range(steps):
        pos = context + step
        ref.token_ids, ref.positions = torch.tensor([token]), torch.tensor([pos])
        ref.epoch += 1
        run_step(program, ref)
        out = backend.decode(torch.tensor(token, device="cuda"), pos)
        got = int(out.greedy_token)
        backend.check_error(got)
        ref_logits = ref.buffers["logits"][0]
        assert_close(out.logits, ref_logits, f"logits at step {step}")
        want = int(ref.buffers["next_token"][0])
        assert got == want or ref_logits[got] >= ref_logits[want] - 1e-3 * ref_logits.abs().max()
        token = got
    counters = backend.state.counters.cpu()
    assert torch.equal(counters, ref.counters), "GPU counters differ from target * epoch"
    assert_close(cache_gpu.k, cache_cpu.k, "k_cache")
    assert_close(cache_gpu.v, cache_cpu.v, "v_cache")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_repeated_runs_bit_identical_and_pipelined(cfg_name):
    cfg, _, _, cache_gpu, backend = make_backend_case(cfg_name, context=40, steps=8)
    k0, v0 = cache_gpu.k.clone(), cache_gpu.v.clone()
    first = None
    for _ in range(20):                      # same token at the same position: same bits
        out = backend.decode(torch.tensor(5, device="cuda"), 40)
        logits, token = out.logits.clone(), int(out.greedy_token)
        backend.check_error(token)
        if first is None:
            first = (logits, token)
        assert torch.equal(logits, first[0]) and token == first[1]

    def tokens(pipelined: bool):
        cache_gpu.k.copy_(k0)
        cache_gpu.v.copy_(v0)
        backend.reset()
        pending, seen = torch.tensor(5, device="cuda"), []
        for pos in range(40, 48):
            out = backend.decode(pending, pos)
            if pipelined:
                seen.append(pending.clone())  # read back only at the end
            else:
                seen.append(int(out.greedy_token))
            pending = out.greedy_token
        if pipelined:
            seen = [int(t) for t in seen[1:]] + [int(pending)]
        backend.check_error()
        return seen

    assert tokens(pipelined=True) == tokens(pipelined=False)


def test_refused_launch_raises_and_backend_recovers():
    # A check in the compiled binding (here: a prefetch budget beyond its uint32) must
    # raise RuntimeError, not crash the process, and the next step must run as before.
    _, _, _, _, backend = make_backend_case("hd64-gqa4", context=40, steps=4)
    out = backend.decode(torch.tensor(9, device="cuda"), 40)
    want_logits, want_token = out.logits.clone(), int(out.greedy_token)
    backend.check_error(want_token)
    epoch = backend.state.epoch
    backend.prefetch_bytes = 1 << 31
    with pytest.raises(RuntimeError, match="megakernel: prefetch_bytes out of range"):
        backend.decode(torch.tensor(9, device="cuda"), 40)
    assert backend.state.epoch == epoch
    backend.prefetch_bytes = None
    out = backend.decode(torch.tensor(9, device="cuda"), 40)
    assert int(out.greedy_token) == want_token
    assert torch.equal(out.logits, want_logits)
    backend.check_error()


def test_a_refused_launch_leaves_no_cuda_error_pending():
    # A CUDA runtime call that fails inside the binding (here: the device pointer of a
    # pageable host_status) must not leave its error as the thread's last error: torch's
    # next kernel launch checks cudaGetLastError() and would raise it from an unrelated op.
    case = OpCase("hd64-gqa4")
    case.run([make(EMBED)])
    from megakernel.backends.megakernel_backend import KernelState, load_extension

    state = KernelState.create(load_extension(), 1, "cuda")
    state.host_status = torch.zeros_like(state.host_status)          # pageable
    with pytest.raises(RuntimeError, match="host_status is not mapped pinned memory"):
        case.run_program([make(EMBED)], weights=case.w_gpu, buffers=case.gpu,
                         k_cache=case.cache_gpu.k, v_cache=case.cache_gpu.v,
                         page_table=case.cache_gpu.page_table, token_ids=[case.token],
                         positions=[case.position], num_counters=1, state=state)
    assert state.epoch == 0
    assert float((torch.ones(8, device="cuda") * 2).sum()) == 16.0
    case.gpu["hidden"].zero_()
    case.run([make(EMBED)])
    case.check("hidden")


def test_broken_dependency_raises_and_backend_recovers():
    cfg_name = "hd64-gqa4"
    cfg, _, _, cache_gpu, good = make_backend_case(cfg_name, context=40, steps=4)
    k0, v0 = cache_gpu.k.clone(), cache_gpu.v.clone()
    out = good.decode(torch.tensor(9, device="cuda"), 40)
    want_logits, want_token = out.logits.clone(), int(out.greedy_token)
    good.check_error(want_token)

    program = good.program
    rows = program.instructions.clone()
    index = next(i for i, r in enumerate(rows.tolist()) if r[0] == ATTENTION_PARTIAL.code)
    rows[index, 3] = 1 << 30                     # a target its counter never reaches
    broken = Program(**{**program.__dict__, "instructions": rows, "decoded": []})

    from megakernel.backends.megakernel_backend import MegakernelBackend

    backend = MegakernelBackend(good.weights, cache_gpu, max_seq_len=MAX_SEQ, timeout_s=0.25,
                                program=broken)
    for attempt in range(2):
        t0 = time.perf_counter()
        out = backend.decode(torch.tensor(9, device="cuda"), 40)
        token = int(out.greedy_token)
        assert time.perf_counter() - t0 < 5.0
        assert token < 0
        with pytest.raises(KernelFaultError) as e:
            # The first time with the token, the second from the host status alone.
            backend.check_error(token if attempt == 0 else None)
        rec = e.value.record
        # The block that timed out first may wait downstream of the broken instruction
        # (every waiter times out after the same bound); the root names the broken one.
        assert rec["kind"] == "timeout" and rec["instruction"] >= index
        assert rec["seen"] < rec["target"]
        root = rec["root"]
        assert root["instruction"] == index and root["opcode_name"] == "attention_partial"
        assert root["layer"] == 0 and root["counter"] == int(rows[index, 2])
        assert root["counter_name"] == "L0.qkv" and root["target"] == 1 << 30
        assert root["seen"] == program.counter_targets[root["counter"]]
        assert "attention_partial" in str(e.value) and "L0.qkv" in str(e.value)
        assert backend.state.epoch == 0

    backend.load_program(program)
    cache_gpu.k.copy_(k0)
    cache_gpu.v.copy_(v0)
    out = backend.decode(torch.tensor(9, device="cuda"), 40)
    token = int(out.greedy_token)
    backend.check_error(token)
    assert token == want_token and torch.equal(out.logits, want_logits)
