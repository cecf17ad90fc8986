"""Named model shapes and seeded random weights for them.

The real presets carry the exact shapes of the published Llama checkpoints, so the kernels
can be tested and benchmarked at full size without downloading anything. `tiny` is small
enough for CPU tests.
"""
from __future__ import annotations

import torch

from .config import ModelConfig, rope_tables
from .weights import Weights

# Llama 3.1 / 3.2 use the same llama3 RoPE scaling shape; only the factor differs.
_LLAMA3_ROPE_3_2 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_3_1 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE_3_2), tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,)),
    "llama-3.2-3b": ModelConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE_3_2), tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,)),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE_3_1), tie_word_embeddings=False,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,)),
    # Ids 0..255 are bytes (see tokenizer.ByteTokenizer); BOS/EOS sit just above them.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, max_position_embeddings=4096,
        bos_token_id=256, eos_token_ids=(257,)),
}

# Standard deviation of the noise around 1.0 in the RMSNorm gains: large enough that a
# kernel applying the wrong gain (or none) produces visibly different outputs.
_NORM_NOISE_STD = 0.05


# Logit spread of random models (see random_weights): random weights with the usual
# init give nearly flat logits over the vocabulary, where bf16 rounding alone flips the
# greedy token.
PEAKED_LOGIT_STD = 8.0


def random_weights(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device=None, max_positions: int = 4096, init_std: float = 0.02,
                   lm_head_std: float | None = None) -> Weights:
    """Seeded random Weights for `config`, generated directly on `device`.

    Matrices are normal(0, init_std); lm_head (and the embedding itself when tied) is
    normal(0, lm_head_std), by default PEAKED_LOGIT_STD / sqrt(hidden_size) so logits have
    a standard deviation of about PEAKED_LOGIT_STD: greedy choices are then decided by
    clear margins, and backends that differ only by rounding pick the same tokens; RMSNorm gains are 1 + normal(0, 0.05). All matrices are
    `dtype` on `device` (default: CPU); rope_cos/rope_sin are [max_positions, head_dim / 2]
    float32. The same seed gives the same weights on the same device type and dtype (CPU
    and CUDA generators produce different streams). Tensors are filled in place from a
    torch.Generator living on `device`, so an 8B model never passes through host memory.
    device='meta' gives shape-only weights (no values), useful to check big presets.
    """
    device = torch.device(device if device is not None else "cpu")
    c = config
    L, H, I, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    lm_std = PEAKED_LOGIT_STD / H ** 0.5 if lm_head_std is None else lm_head_std
    gen = None
    if device.type != "meta":
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    def normal(shape, std, mean=0.0):
        t = torch.empty(shape, dtype=dtype, device=device)
        if device.type != "meta":
            t.normal_(mean, std, generator=gen)
        return t

    # Fixed generation order: changing it changes every seeded model downstream.
    embed = normal((V, H), lm_std if c.tie_word_embeddings else init_std)
    attn_norm = normal((L, H), _NORM_NOISE_STD, mean=1.0)
    qkv = normal((L, c.qkv_size, H), init_std)
    o_proj = normal((L, H, c.q_size), init_std)
    mlp_norm = normal((L, H), _NORM_NOISE_STD, mean=1.0)
    gate_up = normal((L, 2 * I, H), init_std)
    down = normal((L, H, I), init_std)
    final_norm = normal((H,), _NORM_NOISE_STD, mean=1.0)
    lm_head = embed if c.tie_word_embeddings else normal((V, H), lm_std)
    cos, sin = rope_tables(c, max_positions, device=device)
    return Weights(config=c, embed=embed, attn_norm=attn_norm, qkv=qkv, o_proj=o_proj,
                   mlp_norm=mlp_norm, gate_up=gate_up, down=down, final_norm=final_norm,
                   lm_head=lm_head, rope_cos=cos, rope_sin=sin)
