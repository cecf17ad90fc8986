"""Fused, layer-stacked weights: the one layout every backend reads.

Layers are stacked along a leading [num_layers] axis so the CUDA kernel addresses any
layer as base + layer * stride. Projections that share an input vector are fused at load:
QKV rows are [q heads | k heads | v heads], gate|up rows are [gate | up]. Matrices keep the
nn.Linear convention [out_features, in_features].
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .config import ModelConfig, rope_tables


@dataclass
class Weights:
    config: ModelConfig
    embed: torch.Tensor        # [V, H]
    attn_norm: torch.Tensor    # [L, H]
    qkv: torch.Tensor          # [L, (nq + 2 nkv) * hd, H]
    o_proj: torch.Tensor       # [L, H, nq * hd]
    mlp_norm: torch.Tensor     # [L, H]
    gate_up: torch.Tensor      # [L, 2 I, H]  rows: gate then up
    down: torch.Tensor         # [L, H, I]
    final_norm: torch.Tensor   # [H]
    lm_head: torch.Tensor      # [V, H]; the same storage as embed when tied
    rope_cos: torch.Tensor     # [max_positions, hd / 2] float32
    rope_sin: torch.Tensor     # [max_positions, hd / 2] float32

    MATRIX_NAMES = ("embed", "attn_norm", "qkv", "o_proj", "mlp_norm", "gate_up", "down",
                    "final_norm", "lm_head")

    @property
    def dtype(self) -> torch.dtype:
        return self.qkv.dtype

    @property
    def device(self) -> torch.device:
        return self.qkv.device

    def check_shapes(self) -> None:
        """Raise ValueError naming the first tensor whose shape is not what config says."""
        c = self.config
        L, H, I, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
        expected = {
            "embed": (V, H), "attn_norm": (L, H), "qkv": (L, c.qkv_size, H),
            "o_proj": (L, H, c.q_size), "mlp_norm": (L, H), "gate_up": (L, 2 * I, H),
            "down": (L, H, I), "final_norm": (H,), "lm_head": (V, H),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"weight '{name}' has shape {got}, expected {shape}")

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Weights":
        """Move/cast matrices (RoPE tables stay float32). Keeps embed/lm_head tied."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self.MATRIX_NAMES:
                if f.name == "lm_head" and self.lm_head is self.embed:
                    continue
                moved[f.name] = v.to(device=device, dtype=dtype)
            elif isinstance(v, torch.Tensor):
                moved[f.name] = v.to(device=device)
            else:
                moved[f.name] = v
        if "lm_head" not in moved:
            moved["lm_head"] = moved["embed"]
        return Weights(**moved)

    def nbytes(self) -> int:
        """Bytes of the matrices, a tied embedding / LM head counted once."""
        total = 0
        for name in self.MATRIX_NAMES:
            if name == "lm_head" and self.lm_head is self.embed:
                continue
            t = getattr(self, name)
            total += t.numel() * t.element_size()
        return total


def fuse_layer_tensors(config: ModelConfig, get, dtype: torch.dtype, device,
                       max_positions: int, progress=None) -> Weights:
    """Build Weights from Hugging Face tensor names.

    `get(name)` returns the tensor stored under a Hugging Face Llama name, e.g.
    'model.layers.3.self_attn.q_proj.weight'. Stacked tensors are allocated once on the
    target device and filled layer by layer, so peak memory stays one model plus one layer.
    """
    c = config
    L, H, I = c.num_layers, c.hidden_size, c.intermediate_size

    def empty(*shape):
        return torch.empty(shape, dtype=dtype, device=device)

    def load(name):
        return get(name).to(device=device, dtype=dtype)

    attn_norm, mlp_norm = empty(L, H), empty(L, H)
    qkv, o_proj = empty(L, c.qkv_size, H), empty(L, H, c.q_size)
    gate_up, down = empty(L, 2 * I, H), empty(L, H, I)
    for layer in range(L):
        p = f"model.layers.{layer}."
        attn_norm[layer] = load(p + "input_layernorm.weight")
        mlp_norm[layer] = load(p + "post_attention_layernorm.weight")
        qkv[layer, : c.q_size] = load(p + "self_attn.q_proj.weight")
        qkv[layer, c.q_size: c.q_size + c.kv_size] = load(p + "self_attn.k_proj.weight")
        qkv[layer, c.q_size + c.kv_size:] = load(p + "self_attn.v_proj.weight")
        o_proj[layer] = load(p + "self_attn.o_proj.weight")
        gate_up[layer, :I] = load(p + "mlp.gate_proj.weight")
        gate_up[layer, I:] = load(p + "mlp.up_proj.weight")
        down[layer] = load(p + "mlp.down_proj.weight")
        if progress is not None:
            progress(layer + 1, L)
    embed = load("model.embed_tokens.weight")
    lm_head = embed if c.tie_word_embeddings else load("lm_head.weight")
    cos, sin = rope_tables(c, max_positions, device=device)
    return Weights(config=c, embed=embed, attn_norm=attn_norm, qkv=qkv, o_proj=o_proj,
                   mlp_norm=mlp_norm, gate_up=gate_up, down=down,
                   final_norm=load("model.norm.weight"), lm_head=lm_head,
                   rope_cos=cos, rope_sin=sin)


def unfuse_to_hf_tensors(weights: Weights) -> dict[str, torch.Tensor]:
    """The inverse of fuse_layer_tensors: Hugging Face names -> contiguous CPU tensors."""
    c = weights.config
    I = c.intermediate_size
    out: dict[str, torch.Tensor] = {}

    def put(name, t):
        out[name] = t.detach().to("cpu").contiguous().clone()

    put("model.embed_tokens.weight", weights.embed)
    for layer in range(c.num_layers):
        p = f"model.layers.{layer}."
        put(p + "input_layernorm.weight", weights.attn_norm[layer])
        put(p + "post_attention_layernorm.weight", weights.mlp_norm[layer])
        qkv = weights.qkv[layer]
        put(p + "self_attn.q_proj.weight", qkv[: c.q_size])
        put(p + "self_attn.k_proj.weight", qkv[c.q_size: c.q_size + c.kv_size])
        put(p + "self_attn.v_proj.weight", qkv[c.q_size + c.kv_size:])
        put(p + "self_attn.o_proj.weight", weights.o_proj[layer])
        put(p + "mlp.gate_proj.weight", weights.gate_up[layer, :I])
        put(p + "mlp.up_proj.weight", weights.gate_up[layer, I:])
        put(p + "mlp.down_proj.weight", weights.down[layer])
    put("model.norm.weight", weights.final_norm)
    if not c.tie_word_embeddings:
        put("lm_head.weight", weights.lm_head)
    return out
