"""Token selection from logits: greedy, temperature, top-k and top-p (nucleus).

Everything stays on the logits' device so the engine can launch the next step before
reading the chosen token back.
"""
from __future__ import annotations

import math
import operator

import torch

from .errors import InvalidRequestError


def validate_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if (not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {temperature}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise InvalidRequestError(f"top_k must be an integer >= 0, got {top_k}")


# What torch.Generator.manual_seed takes.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def check_seed(seed) -> int | None:
    """`seed` as an int torch's generators take, or None (the engine's seed)."""
    if seed is None:
        return None
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise InvalidRequestError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return value


# torch.topk of one long vector runs in few thread blocks (~58 us for a 128K vocabulary on
# an H100, benchmarks/RESULTS.md entry 53). The k-th largest of the whole is the k-th
# largest of its segments' own top k, found by two topk calls over many rows, then few.
TOPK_SEGMENT = 1024


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk(x, k).values[-1] for a 1-D x and 1 <= k <= len(x), as a [] tensor."""
    n = x.shape[-1]
    if n <= 4 * TOPK_SEGMENT or 4 * k > TOPK_SEGMENT:
        return torch.topk(x, k).values[-1]
    segments = -(-n // TOPK_SEGMENT)
    padded = torch.nn.functional.pad(x, (0, segments * TOPK_SEGMENT - n),
                                     value=float("-inf"))
    candidates = torch.topk(padded.view(segments, TOPK_SEGMENT), k, dim=-1).values
    return torch.topk(candidates.flatten(), k).values[-1]


def masked_scores(logits: torch.Tensor, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
    """logits [V] / temperature, -inf outside the top-k tokens and the top-p nucleus: the
    distribution sample() draws from is softmax of this."""
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = kth_largest(scores, top_k)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator) -> torch.Tensor:
    """logits [V] float32 -> [] int64 sampled token (temperature > 0)."""
    scores = masked_scores(logits, temperature, top_k, top_p)
    # Gumbel-max: the index of the largest scores + G, G_i = -log(-log(U_i)) i.i.d. with U
    # uniform, is a draw from softmax(scores), in a few elementwise kernels and one argmax
    # (softmax + multinomial took ~0.14 ms per step of a 128K vocabulary on an H100:
    # benchmarks/RESULTS.md, entry 49). U = 0 gives G = -inf: that token is skipped, as
    # masked ones are; float32 U caps G near 16.6, which only matters for tokens below
    # ~1e-7 of the probability.
    gumbel = torch.rand(scores.shape, generator=generator, device=scores.device)
    gumbel = gumbel.log_().neg_().log_().neg_()
    return torch.argmax(scores + gumbel)
