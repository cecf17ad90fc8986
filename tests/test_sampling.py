"""sampling.sample draws from the distribution it promises: softmax(logits / temperature)
restricted to the top-k tokens and to the top-p nucleus, renormalized."""
from __future__ import annotations

import pytest
import torch

from megakernel.instructions.base import gumbel_noise
from megakernel.sampling import kth_largest, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 20000


def expected(temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The target distribution, written out independently of the sampler."""
    probs = torch.softmax(LOGITS.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or (rank > 0 and mass >= top_p):
            break
        keep[token] = True
        mass += float(probs[token])
    kept = torch.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (2.0, 4, 0.9)])
def test_sample_frequencies_match_the_distribution(temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(11)
    counts = torch.zeros(len(LOGITS), dtype=torch.float64)
    for _ in range(DRAWS):
        counts[int(sample(LOGITS, temperature, top_k, top_p, generator))] += 1
    want = expected(temperature, top_k, top_p)
    freq = counts / DRAWS
    assert torch.equal(freq == 0, want == 0)        # excluded tokens never drawn
    sigma = (want * (1 - want) / DRAWS).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-9).all(), (freq.tolist(), want.tolist())


def test_masked_or_underflowing_scores_are_never_drawn():
    logits = torch.tensor([0.0, -1e30, float("-inf"), 1.0])
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, 0, 1.0, generator)) for _ in range(2000)}
    assert drawn == {0, 3}


def test_the_kernels_gumbel_noise_draws_from_the_softmax():
    """The LM head's sampling (instructions.base.gumbel_noise, mirrored in csrc/common.cuh):
    the argmax of logits / temperature + noise, over many steps' positions, has the
    softmax's frequencies, and the noise is fixed by (seed, position, row)."""
    temperature, seed = 1.3, 987654321
    rows = torch.arange(len(LOGITS))
    counts = torch.zeros(len(LOGITS), dtype=torch.float64)
    for position in range(DRAWS):
        scores = LOGITS / temperature + gumbel_noise(seed, position, rows)
        counts[int(torch.argmax(scores))] += 1
    want = expected(temperature, 0, 1.0)
    sigma = (want * (1 - want) / DRAWS).sqrt()
    assert ((counts / DRAWS - want).abs() <= 5 * sigma).all(), (counts / DRAWS, want)
    assert torch.equal(gumbel_noise(seed, 5, rows), gumbel_noise(seed, 5, rows))
    assert not torch.equal(gumbel_noise(seed, 5, rows), gumbel_noise(seed + 1, 5, rows))
    assert not torch.equal(gumbel_noise(seed, 5, rows), gumbel_noise(seed, 6, rows))


@pytest.mark.parametrize("n,k", [(10, 3), (4096, 7), (4097, 1), (128256, 50), (128256, 256),
                                 (50000, 300)])
def test_kth_largest_equals_topk(n, k):
    """The two-stage k-th largest equals torch.topk's, with ties, -inf and NaN about."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, generator=gen).round(decimals=2)     # many ties
    x[torch.randint(0, n, (n // 10,), generator=gen)] = float("-inf")
    assert torch.equal(kth_largest(x, k), torch.topk(x, k).values[-1])
    x[n // 2] = float("nan")
    got, want = kth_largest(x, k), torch.topk(x, k).values[-1]
    assert torch.equal(got, want) or (got.isnan() and want.isnan())


def device_draw_ops(blocks, top_k: int, top_p: float):
    """The instructions a sampled program runs after the LM head (scheduler.sampling), for
    blocks [(row_begin, row_count)] of one token's logits, in order."""
    from megakernel.instructions import (ARGMAX_REDUCE, SAMPLE_LOGITS, TOPK_PARTIAL,
                                         TOPK_THRESHOLD, TOPP_HISTOGRAM, TOPP_SELECT)

    ops = []
    if top_k:       # with top_p too: the threshold stage takes the nucleus among the top k
        ops += [TOPK_PARTIAL.make(block_index=b, row_begin=r0, row_count=n)
                for b, (r0, n) in enumerate(blocks)]
        ops.append(TOPK_THRESHOLD.make(num_blocks=len(blocks)))
    elif top_p < 1.0:
        for pass_index in range(4):
            ops += [TOPP_HISTOGRAM.make(block_index=b, row_begin=r0, row_count=n,
                                        pass_index=pass_index)
                    for b, (r0, n) in enumerate(blocks)]
            ops.append(TOPP_SELECT.make(pass_index=pass_index))
    ops += [SAMPLE_LOGITS.make(block_index=b, row_begin=r0, row_count=n)
            for b, (r0, n) in enumerate(blocks)]
    ops.append(ARGMAX_REDUCE.make(num_blocks=len(blocks)))
    return ops


def device_draw_state(logits: torch.Tensor, blocks, sampling):
    """A MachineState stand-in with the buffers device_draw_ops use, for logits [V]."""
    from types import SimpleNamespace

    from megakernel.instructions import MAX_TOP_K

    B = len(blocks)
    buffers = {"logits": logits[None].clone(), "topk_values": torch.zeros(1, B * MAX_TOP_K),
               "topk_ties": torch.zeros(1, B, dtype=torch.int32),
               "topp_hist": torch.zeros(1, 4 * 256, dtype=torch.int64),
               "topp_state": torch.zeros(1, 4, dtype=torch.float64),
               "sample_threshold": torch.zeros(1),
               # The LM head's partial maxima, which the top-p ops read.
               "argmax_value": torch.stack([logits[r0:r0 + n].max() for r0, n in blocks])[None],
               "argmax_index": torch.zeros(1, B, dtype=torch.int32),
               "next_token": torch.zeros(1, dtype=torch.int32)}
    return SimpleNamespace(buffers=buffers, sampling=sampling,
                           positions=torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.3, 0, 1.0), (0.7, 3, 1.0), (2.0, 1, 1.0), (1.3, 0, 0.8), (2.0, 0, 0.5), (2.0, 4, 0.9),
    (1.3, 5, 0.6)])
def test_the_device_draw_has_the_distributions_frequencies(temperature, top_k, top_p):
    """The draw a sampled program makes (its ops after the LM head, in their reference
    semantics, over two blocks of rows), across many steps' positions: the frequencies of
    softmax(logits / temperature) over the top-k tokens, the top-p nucleus or the nucleus
    of the top k."""
    from megakernel.instructions import Sampling

    blocks = [(0, 2), (2, 4)]
    state = device_draw_state(LOGITS, blocks, Sampling(1 / temperature, 987, top_k, top_p))
    ops = device_draw_ops(blocks, top_k, top_p)
    counts = torch.zeros(len(LOGITS), dtype=torch.float64)
    draws = DRAWS // 4
    partial_max = state.buffers["argmax_value"].clone()
    for position in range(draws):
        state.positions[0] = position
        state.buffers["argmax_value"].copy_(partial_max)   # as the LM head leaves them
        for op in ops:
            op.spec.reference(op, state)
        counts[int(state.buffers["next_token"][0])] += 1
    want = expected(temperature, top_k, top_p)
    freq = counts / draws
    assert torch.equal(freq == 0, want == 0)
    sigma = (want * (1 - want) / draws).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-9).all(), (freq.tolist(), want.tolist())


def device_threshold(logits: torch.Tensor, blocks, temperature: float, top_k: int,
                     top_p: float) -> torch.Tensor:
    """The threshold a sampled program's ops before sample_logits leave (reference
    semantics), for logits [V] in blocks [(row_begin, row_count)]."""
    from megakernel.instructions import Sampling

    state = device_draw_state(logits, blocks, Sampling(1 / temperature, 1, top_k, top_p))
    for op in device_draw_ops(blocks, top_k, top_p)[:-len(blocks) - 1]:
        op.spec.reference(op, state)
    return state.buffers["sample_threshold"][0]


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.9), (0.6, 0, 0.95), (1.5, 0, 0.3), (0.8, 0, 0.999), (1.0, 50, 0.9),
    (0.6, 64, 0.95), (2.0, 7, 0.5), (1.0, 1, 0.9)])
def test_the_device_nucleus_is_the_samplers(temperature, top_k, top_p):
    """The threshold the top-p ops, or the top-k ops with top_p < 1, find (1000 random
    logits in three blocks) keeps exactly the tokens sampling.masked_scores keeps."""
    from megakernel.sampling import masked_scores

    logits = 3 * torch.randn(1000, generator=torch.Generator().manual_seed(int(top_p * 1e3)))
    blocks = [(0, 300), (300, 300), (600, 400)]
    kept = logits >= device_threshold(logits, blocks, temperature, top_k, top_p)
    want = masked_scores(logits, temperature, top_k, top_p) > float("-inf")
    assert torch.equal(kept, want), (int(kept.sum()), int(want.sum()))


def tied_logits(kind: str) -> torch.Tensor:
    """1000 logits with ties: "steps", 12 values ~83 times each; "shelf", four large
    values over 200 rows tied at 2.0 (spread over the blocks) over distinct small ones."""
    gen = torch.Generator().manual_seed(5)
    if kind == "steps":
        return torch.randint(0, 12, (1000,), generator=gen) / 4.0
    logits = torch.rand(1000, generator=gen)
    logits[torch.randperm(1000, generator=gen)[:200]] = 2.0
    logits[[10, 350, 720, 999]] = torch.tensor([3.0, 2.9, 2.8, 2.7])
    return logits


@pytest.mark.parametrize("kind, top_k, top_p", [
    ("steps", 5, 0.5), ("steps", 20, 0.8), ("steps", 64, 0.99), ("shelf", 10, 0.2),
    ("shelf", 10, 0.05), ("shelf", 64, 0.3), ("shelf", 5, 0.9), ("shelf", 3, 0.9)])
def test_the_top_k_nucleus_counts_every_tie(kind, top_k, top_p):
    """Top-k with top-p over logits with ties, at the k-th largest too, where blocks'
    slots leave tied rows out: the threshold is the smallest logit whose larger survivors
    of the top k (all ties of the k-th largest) hold less than top_p of their mass,
    written out here in float64. On "shelf" with k = 10, counting only the ties the slots
    hold would keep fewer tokens."""
    logits = tied_logits(kind)
    blocks = [(0, 300), (300, 300), (600, 400)]
    temperature = 0.7
    kth = torch.topk(logits, top_k).values[-1]
    survivors = logits[logits >= kth].double()
    mass = torch.exp((survivors - survivors.max()) / temperature)
    target = top_p * mass.sum()
    want = min(float(u) for u in survivors.unique() if mass[survivors > u].sum() < target)
    assert float(device_threshold(logits, blocks, temperature, top_k, top_p)) == want
