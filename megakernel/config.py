"""Model configuration: the subset of Llama that the engine supports, validated once.

A ModelConfig is built from a Hugging Face config.json (dict) or from a preset. Anything
the engine cannot run exactly (biases, MoE, other RoPE scalings) is refused here with an
error naming the offending field, before any weight is read. Mistral checkpoints are the
same architecture under another name; a sliding attention window is exact as long as no
sequence outgrows it, so it only bounds the KV cache (engine.resolve_max_seq_len).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from typing import Any

from .errors import UnsupportedModelError

SUPPORTED_HEAD_DIMS = (64, 128)
# model_type -> its causal-LM architecture: the same layers and weight names.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or the llama3 parameters: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Mistral's attention window: each token sees at most this many (itself included).
    # None: the whole sequence.
    sliding_window: int | None = None

    def __post_init__(self):
        def need(ok: bool, name: str, msg: str):
            if not ok:
                raise UnsupportedModelError(f"config field '{name}': {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            need(int(getattr(self, name)) > 0, name, "must be a positive integer")
        need(self.head_dim in SUPPORTED_HEAD_DIMS, "head_dim",
             f"{self.head_dim} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
        need(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_heads} is not a multiple of "
             f"num_key_value_heads={self.num_kv_heads}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
             "must be a positive integer or null")
        if self.rope_scaling is not None:
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                need(key in self.rope_scaling, "rope_scaling", f"llama3 scaling needs '{key}'")

    # Derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV matrix: q heads, then k heads, then v heads."""
        return self.q_size + 2 * self.kv_size

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    def weight_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of weights a decode step must read once (the memory floor's numerator)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = (self.qkv_size * h + h * self.q_size + 2 * i * h + h * i + 2 * h)
        return dtype_bytes * (L * per_layer + self.vocab_size * h + h)

    def num_parameters(self) -> int:
        n = self.weight_bytes_per_token(1)
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Validate a Hugging Face Llama or Mistral config dict and convert it."""
        def refuse(name: str, msg: str):
            raise UnsupportedModelError(f"config field '{name}': {msg}")

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            refuse("model_type", f"'{model_type}' is not supported (supported: "
                   f"{', '.join(repr(t) for t in SUPPORTED_ARCHITECTURES)})")
        arch = SUPPORTED_ARCHITECTURES[model_type]
        archs = hf.get("architectures") or [arch]
        if any(a != arch for a in archs):
            refuse("architectures", f"{archs} is not supported for model_type "
                   f"'{model_type}' (only {arch})")
        for name in ("attention_bias", "mlp_bias"):
            if hf.get(name):
                refuse(name, "biases are not supported")
        # transformers' Llama has no window; a Llama config naming one is not what it runs.
        window = hf.get("sliding_window") or None
        if window is not None and model_type != "mistral":
            refuse("sliding_window", "sliding-window attention is supported for Mistral only")
        for name in ("num_local_experts", "num_experts", "n_routed_experts"):
            if hf.get(name):
                refuse(name, "mixture-of-experts models are not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            refuse("hidden_act", f"'{act}' is not supported (only 'silu')")
        pretraining_tp = hf.get("pretraining_tp", 1)
        if pretraining_tp not in (None, 1):
            refuse("pretraining_tp", f"{pretraining_tp} is not supported (only 1)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            if name not in hf:
                refuse(name, "missing")

        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        num_kv = int(hf.get("num_key_value_heads") or num_heads)

        scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers >= 5 folds rope_theta and the scaling into 'rope_parameters'.
        params = hf.get("rope_parameters")
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = params
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                refuse("rope_scaling", f"rope type '{kind}' is not supported "
                       "(supported: none, 'llama3')")
            else:
                scaling = {k: scaling[k] for k in ("factor", "low_freq_factor",
                                                   "high_freq_factor",
                                                   "original_max_position_embeddings")
                           if k in scaling}
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            sliding_window=None if window is None else int(window),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json for this model (used by save_pretrained)."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": ({"rope_type": "llama3", **self.rope_scaling}
                             if self.rope_scaling else None),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.sliding_window is not None:     # only Mistral's config names one
            d.update(architectures=["MistralForCausalLM"], model_type="mistral",
                     sliding_window=self.sliding_window)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                                 else self.eos_token_ids[0])
        return d


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [head_dim // 2] float32, with llama3 scaling when configured."""
    import torch

    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64)
                                         .to(torch.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, max_positions: int, device=None):
    """cos, sin tables [max_positions, head_dim // 2] float32 for the rotate-half RoPE."""
    import torch

    inv_freq = rope_inv_freq(cfg).to(device)
    pos = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    return freqs.cos().contiguous(), freqs.sin().contiguous()
