"""Model loading: presets, save/load round trips, transformers checkpoints, bad inputs,
tokenizers. CPU only; tiny models only."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megakernel.config import ModelConfig, rope_inv_freq
from megakernel.errors import CheckpointError, InvalidRequestError, UnsupportedModelError
from megakernel.loading import (expected_tensor_shapes, load_model, resolve_model,
                                save_pretrained)
from megakernel.presets import PRESETS, random_weights
from megakernel.tokenizer import ByteTokenizer, HFTokenizer
from megakernel.weights import Weights
from conftest import make_hf_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


def tiny_config(tied: bool = False, **overrides) -> ModelConfig:
    return dataclasses.replace(TINY, tie_word_embeddings=tied, **overrides)


def assert_same_weights(a: Weights, b: Weights) -> None:
    assert a.config == b.config
    for name in Weights.MATRIX_NAMES + ("rope_cos", "rope_sin"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


def save_tiny(path, tied=False, **kw) -> Weights:
    w = random_weights(tiny_config(tied), seed=1)
    save_pretrained(w, path, **kw)
    return w


# Presets and random weights ----------------------------------------------------------

def test_real_presets_have_exact_shapes():
    llama32_rope = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
    common = dict(vocab_size=128256, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,))
    assert PRESETS["llama-3.2-1b"] == ModelConfig(
        hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, head_dim=64,
        rope_scaling=llama32_rope, tie_word_embeddings=True, **common)
    assert PRESETS["llama-3.2-3b"] == ModelConfig(
        hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, head_dim=128,
        rope_scaling=llama32_rope, tie_word_embeddings=True, **common)
    assert PRESETS["llama-3.1-8b"] == ModelConfig(
        hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, head_dim=128,
        rope_scaling=dict(llama32_rope, factor=8.0), tie_word_embeddings=False, **common)
    assert PRESETS["tiny"] == ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=256,
        eos_token_ids=(257,))
    # Published parameter counts (embedding counted once when tied).
    assert PRESETS["llama-3.2-1b"].num_parameters() == 1_235_814_400
    assert PRESETS["llama-3.2-3b"].num_parameters() == 3_212_749_824
    assert PRESETS["llama-3.1-8b"].num_parameters() == 8_030_261_248


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"])
def test_big_presets_random_weights_on_meta(name):
    cfg = PRESETS[name]
    w = random_weights(cfg, dtype=torch.bfloat16, device="meta", max_positions=128)
    w.check_shapes()
    assert w.device.type == "meta" and w.dtype == torch.bfloat16
    assert (w.lm_head is w.embed) == cfg.tie_word_embeddings
    assert w.qkv.shape == (cfg.num_layers, (cfg.num_heads + 2 * cfg.num_kv_heads)
                           * cfg.head_dim, cfg.hidden_size)
    assert w.rope_cos.shape == (128, cfg.head_dim // 2)


def test_random_tiny_is_seeded_and_sane():
    a = random_weights(TINY, seed=3)
    b = random_weights(TINY, seed=3)
    c = random_weights(TINY, seed=4)
    a.check_shapes()
    assert_same_weights(a, b)
    assert not torch.equal(a.qkv, c.qkv)
    assert abs(a.gate_up.std().item() - 0.02) < 0.002
    assert abs(a.attn_norm.mean().item() - 1.0) < 0.05 and a.attn_norm.std() > 0
    assert random_weights(TINY, lm_head_std=1.0).lm_head.std() > 0.5
    tied = random_weights(tiny_config(tied=True))
    assert tied.lm_head is tied.embed
    half = random_weights(TINY, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.rope_cos.dtype == torch.float32


def test_load_random_spec():
    seen = []
    w, tok = load_model("random:tiny", seed=5, max_positions=64,
                        progress=lambda d, t: seen.append((d, t)))
    assert_same_weights(w, random_weights(TINY, seed=5, max_positions=64))
    assert w.dtype == torch.float32 and w.device.type == "cpu"
    assert isinstance(tok, ByteTokenizer)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (256, (257,), 512)
    assert seen[-1] == (2, 2)
    with pytest.raises(CheckpointError, match="unknown preset 'nope'"):
        load_model("random:nope")


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3.1-8b"])
def test_llama3_rope_matches_transformers(preset):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = PRESETS[preset]
    hf = LlamaConfig(**cfg.to_hf_dict())
    expected, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, device="cpu")
    assert scaling == 1.0
    got = rope_inv_freq(cfg)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected.to(torch.float32))


# Save / load round trips -------------------------------------------------------------

@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_save_load_round_trip(tmp_path, stored, tied, sharded):
    w = random_weights(tiny_config(tied), seed=2, dtype=stored, max_positions=256)
    save_pretrained(w, tmp_path, max_shard_size=300_000 if sharded else None)

    files = set(os.listdir(tmp_path))
    if sharded:
        assert "model.safetensors" not in files
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and set(shards) <= files
        total = 0
        for shard in shards:
            total += sum(t.numel() * t.element_size()
                         for t in load_file(tmp_path / shard).values())
        assert index["metadata"]["total_size"] == total
        names = set(index["weight_map"])
    else:
        assert "model.safetensors.index.json" not in files
        names = set(load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in names) != tied
    assert names == set(expected_tensor_shapes(w.config))

    loaded, tok = load_model(str(tmp_path), dtype=stored, max_positions=256)
    assert tok is None
    assert_same_weights(w, loaded)
    assert (loaded.lm_head is loaded.embed) == tied


def test_stored_dtype_conversion(tmp_path):
    w = random_weights(TINY, seed=2)
    save_pretrained(w, tmp_path, dtype=torch.bfloat16)
    config, source = resolve_model(str(tmp_path))
    assert config == TINY and source.stored_dtype == torch.bfloat16
    loaded, _ = load_model(str(tmp_path), dtype="fp32")
    assert_same_weights(w.to(dtype=torch.bfloat16).to(dtype=torch.float32), loaded)


def test_progress_called_per_layer(tmp_path):
    save_tiny(tmp_path)
    seen = []
    load_model(str(tmp_path), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]


def test_resave_replaces_stale_weight_files(tmp_path):
    save_tiny(tmp_path)
    w = save_tiny(tmp_path, max_shard_size=300_000)
    assert "model.safetensors" not in os.listdir(tmp_path)
    save_pretrained(w, tmp_path)
    assert "model.safetensors.index.json" not in os.listdir(tmp_path)
    assert_same_weights(w, load_model(str(tmp_path))[0])


# transformers interoperability ------------------------------------------------------

def hf_tiny_config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=16384, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=256, eos_token_id=257)


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_checkpoint_loads(tmp_path, tied):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_tiny_config(tied)).eval()
    with torch.no_grad():  # HF inits norms to exactly 1: perturb them to catch mix-ups
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    w, tok = load_model(str(tmp_path), dtype=torch.float32, max_positions=64)
    assert tok is None
    c = w.config
    assert (c.tie_word_embeddings, c.rope_theta, c.rope_scaling["factor"]) == (tied, 500000.0, 32.0)
    m = model.model
    assert torch.equal(w.embed, m.embed_tokens.weight)
    assert torch.equal(w.final_norm, m.norm.weight)
    assert torch.equal(w.lm_head, model.lm_head.weight)
    for i, layer in enumerate(m.layers):
        a, mlp = layer.self_attn, layer.mlp
        assert torch.equal(w.attn_norm[i], layer.input_layernorm.weight)
        assert torch.equal(w.mlp_norm[i], layer.post_attention_layernorm.weight)
        assert torch.equal(w.qkv[i], torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                a.v_proj.weight]))
        assert torch.equal(w.o_proj[i], a.o_proj.weight)
        assert torch.equal(w.gate_up[i], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(w.down[i], mlp.down_proj.weight)

    # RoPE tables agree with the module's own (rotate-half: halves are duplicated).
    pos = torch.arange(64)[None]
    cos, sin = m.rotary_emb(torch.zeros(1, 64, 256), pos)
    torch.testing.assert_close(w.rope_cos, cos[0, :, :32], rtol=0, atol=1e-5)
    torch.testing.assert_close(w.rope_sin, sin[0, :, :32], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_loads_in_transformers(tmp_path, tied):
    from transformers import LlamaForCausalLM

    w = random_weights(tiny_config(tied), seed=7)
    save_pretrained(w, tmp_path, max_shard_size=300_000)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in expected_tensor_shapes(w.config).items():
        assert tuple(params[name].shape) == t
    assert torch.equal(params["model.embed_tokens.weight"], w.embed)
    assert torch.equal(params["lm_head.weight"], w.lm_head)
    assert torch.equal(params["model.layers.1.self_attn.k_proj.weight"],
                       w.qkv[1, TINY.q_size: TINY.q_size + TINY.kv_size])
    assert torch.equal(params["model.layers.0.mlp.up_proj.weight"],
                       w.gate_up[0, TINY.intermediate_size:])


def test_mistral_checkpoint_loads_and_its_window_bounds_the_sequence(tmp_path):
    """A MistralForCausalLM checkpoint is a Llama under another name: it loads with its
    weights where Llama's are, and its sliding window, when shorter than its positions,
    is the longest max_seq_len (the default stops there too), where the whole-sequence
    attention is still exactly the model's. Saved again, it is a Mistral checkpoint."""
    import megakernel
    from conftest import hf_llama_config, write_hf_checkpoint
    from megakernel.engine import resolve_max_seq_len

    model = write_hf_checkpoint(tmp_path, hf_llama_config(mistral_window=1024))
    w, _ = load_model(str(tmp_path), dtype=torch.float32, max_positions=64)
    assert type(model).__name__ == "MistralForCausalLM"
    assert (w.config.sliding_window, w.config.max_position_embeddings) == (1024, 2048)
    attn = model.model.layers[1].self_attn
    assert torch.equal(w.qkv[1], torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                            attn.v_proj.weight]))
    assert resolve_max_seq_len(None, w.config) == 1024
    assert resolve_max_seq_len(1024, w.config) == 1024
    with pytest.raises(InvalidRequestError,
                       match=r"max_seq_len 1025 exceeds the model's sliding_window \(1024\)"):
        megakernel.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=1025)
    wide = dataclasses.replace(w.config, sliding_window=8192)   # past its positions: moot
    assert resolve_max_seq_len(None, wide) == 2048
    assert resolve_max_seq_len(None, dataclasses.replace(w.config, sliding_window=None)) == 2048
    save_pretrained(w, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"], saved["sliding_window"]) == \
        ("mistral", ["MistralForCausalLM"], 1024)
    assert_same_weights(w, load_model(str(tmp_path / "again"), dtype=torch.float32,
                                      max_positions=64)[0])


# Bad inputs ---------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle a file."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to unpickle")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("./models/nowhere")


def test_file_instead_of_directory(tmp_path):
    save_tiny(tmp_path)
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        load_model(str(tmp_path / "model.safetensors"))


def test_unreadable_directory(tmp_path, monkeypatch):
    save_tiny(tmp_path)
    real_listdir = os.listdir

    # chmod cannot take read access from root, so deny it where the loader asks.
    def listdir(path="."):
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(CheckpointError,
                       match="cannot read checkpoint directory .*Permission denied"):
        load_model(str(tmp_path))


def test_missing_config(tmp_path):
    save_tiny(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))


def test_config_not_json(tmp_path):
    save_tiny(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("change, field", [
    ({"model_type": "qwen2"}, "model_type"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 96}, "head_dim"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unsupported_config(tmp_path, change, field):
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=f"config field '{field}'"):
        resolve_model(str(tmp_path))


def test_config_with_garbage_value(tmp_path):
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = "big"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: invalid value"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("weight_file", ["pytorch_model.bin", "consolidated.00.pth",
                                         "model.pt"])
def test_pickle_only_checkpoint_is_refused(tmp_path, no_unpickling, weight_file):
    save_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    # A real pickle payload: loading it would call os.system.
    (tmp_path / weight_file).write_bytes(
        b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(CheckpointError, match=f"only has pickle weights \\({weight_file}\\)"
                       ".*Convert the checkpoint to safetensors"):
        load_model(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_pickle_next_to_safetensors_is_ignored(tmp_path, no_unpickling):
    w = save_tiny(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    assert_same_weights(w, load_model(str(tmp_path))[0])


def test_no_weights_at_all(tmp_path):
    save_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no model weights \(\*.safetensors\)"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("keep", [-1000, 30, 4])
def test_truncated_safetensors(tmp_path, keep):
    save_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        load_model(str(tmp_path))


def test_corrupt_safetensors_header(tmp_path):
    save_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        load_model(str(tmp_path))


def rewrite_tensors(path: Path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    save_tiny(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError,
                       match="tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        resolve_model(str(tmp_path))


def test_missing_lm_head_when_untied(tmp_path):
    save_tiny(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' is missing"):
        resolve_model(str(tmp_path))


def test_wrong_shape(tmp_path):
    save_tiny(tmp_path)

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 256)
    rewrite_tensors(tmp_path, edit)
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                             r"\[64, 256\], expected \[128, 256\]"):
        resolve_model(str(tmp_path))


def test_config_disagrees_with_tensors(tmp_path):
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight' has shape \[512, 256\], "
                                              r"expected \[1024, 256\]"):
        resolve_model(str(tmp_path))


def test_unexpected_tensor_is_refused(tmp_path):
    save_tiny(tmp_path)

    def edit(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)
    rewrite_tensors(tmp_path, edit)
    with pytest.raises(UnsupportedModelError, match="'model.layers.0.self_attn.q_proj.bias'"):
        resolve_model(str(tmp_path))


def test_quantized_tensor_dtype_is_refused(tmp_path):
    save_tiny(tmp_path)

    def edit(t):
        name = "model.layers.0.mlp.down_proj.weight"
        t[name] = t[name].to(torch.float8_e4m3fn)
    rewrite_tensors(tmp_path, edit)
    with pytest.raises(UnsupportedModelError, match="down_proj.weight' is stored as F8_E4M3"):
        resolve_model(str(tmp_path))


def test_index_points_to_missing_shard(tmp_path):
    save_tiny(tmp_path, max_shard_size=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"lists shard '{shard}', which is missing"):
        resolve_model(str(tmp_path))


def test_bad_index(tmp_path):
    save_tiny(tmp_path, max_shard_size=300_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="has no 'weight_map'"):
        resolve_model(str(tmp_path))


def test_bad_dtype_argument(tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown dtype 'int4'"):
        load_model("random:tiny", dtype="int4")


def test_hub_id_offline_fails_fast(tmp_path):
    """Offline with an empty cache: a clear CheckpointError, quickly, no network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    script = (
        "from megakernel.errors import CheckpointError\n"
        "from megakernel.loading import load_model\n"
        "try:\n"
        "    load_model('meta-llama/Llama-3.2-1B-Instruct')\n"
        "except CheckpointError as e:\n"
        "    print('CheckpointError:', e)\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 60
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert msg.startswith("CheckpointError:") and "\n" not in msg
    assert "HF_HUB_OFFLINE" in msg and "local checkpoint directory" in msg


# Tokenizers ---------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(256, 257)
    text = "Hello, wörld! Ünïcödé — 日本語 🙂"
    ids = tok.encode(text)
    assert ids[0] == 256 and all(0 <= i < 256 for i in ids[1:])
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [257]) == text
    assert tok.decode([104, 105, 300, 33]) == "hi<|300|>!"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # cut multi-byte character
    assert tok.vocab_size == 258 and tok.eos_token_ids == (257,)
    assert ByteTokenizer(None, 257).encode("a") == [97]


def test_byte_tokenizer_chat():
    tok = ByteTokenizer(256, 257)
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template("hi")
    chat = ByteTokenizer(256, 257, chat_format="User: {user}\nAssistant: ")
    assert chat.decode(chat.apply_chat_template("hé")) == "User: hé\nAssistant: "
    with pytest.raises(ValueError):
        ByteTokenizer(65, 257)


def test_checkpoint_tokenizer(tmp_path):
    hf = make_hf_tokenizer(chat=True)
    hf.save_pretrained(tmp_path / "tok")
    w = random_weights(TINY)
    save_pretrained(w, tmp_path / "ckpt", tokenizer=HFTokenizer(tmp_path / "tok"))
    # generation_config.json's EOS list is honoured (Llama 3 Instruct's <|eot_id|>).
    gen = tmp_path / "ckpt" / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [1, 2]}))

    loaded, tok = load_model(str(tmp_path / "ckpt"))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1, 257, 2)
    assert tok.vocab_size == len(hf)
    ids = tok.encode("hello wörld")
    assert ids[0] == 0 and ids[1:] == hf.encode("hello wörld", add_special_tokens=False)
    assert tok.decode(ids + [1]) == "hello wörld"
    chat = tok.apply_chat_template("hello")
    assert chat[0] == 0 and tok._tok.decode(chat) == "<s><user>hello<eot><assistant>"
    turns = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hello"},
                                     {"role": "assistant", "content": "world"},
                                     {"role": "user", "content": "fox"}])
    assert tok._tok.decode(turns) == ("<s><system>be brief<eot><user>hello<eot>"
                                      "<assistant>world<eot><user>fox<eot><assistant>")
    # A template's own refusal is a one-line request error.
    tok._tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="refused the messages: roles must alternate"):
        tok.apply_chat_template("hello")


def test_tokenizer_without_chat_template(tmp_path):
    make_hf_tokenizer(chat=False).save_pretrained(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match="has no chat template"):
        tok.apply_chat_template("hi")


def test_weight_bytes_count_a_tied_head_once():
    """Weights.nbytes on shape-only weights equals the config's bytes per token."""
    cfg = PRESETS["llama-3.2-1b"]
    weights = random_weights(cfg, device="meta", dtype=torch.bfloat16)
    assert weights.lm_head is weights.embed
    assert weights.nbytes() == cfg.weight_bytes_per_token(2)
