"""Shared fixtures: small Llama checkpoints written by transformers itself."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    from megakernel import megakernel_available

    usable, reason = megakernel_available()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"needs the megakernel backend: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def hf_llama_config(num_heads=4, num_kv_heads=2, head_dim=64, hidden=None, layers=2,
                    intermediate=96, vocab=300, tied=False, rope_scaling=False,
                    rope_theta=10000.0, mistral_window=None):
    """A transformers LlamaConfig for a small model (rope_scaling=True: llama3), or with
    mistral_window a MistralConfig of that sliding window (0: none)."""
    from transformers import LlamaConfig, MistralConfig

    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden or num_heads * head_dim,
        intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2,
    )
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
    kwargs["rope_parameters"] = rope
    if mistral_window is not None:
        return MistralConfig(sliding_window=mistral_window or None, **kwargs)
    return LlamaConfig(**kwargs)


def write_hf_checkpoint(path, hf_config, seed=0, dtype=torch.float32, logit_scale=1.0):
    """Save a randomly initialised causal LM of hf_config's architecture (Llama or
    Mistral); returns the fp32 model (with the weights as saved, i.e. rounded to `dtype`).
    logit_scale > 1 makes logits peaked."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).to(torch.float32).eval()
    # The default init (std 0.02) gives nearly flat logits; widen it so greedy choices
    # are decided by clear margins and the comparison tests real structure.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
        model.get_output_embeddings().weight.mul_(logit_scale)
    model.to(dtype).save_pretrained(path)
    # Reload rather than upcast: casting the module to bf16 also rounds its RoPE inverse
    # frequencies, an error that grows with position and is not in the checkpoint.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_hf_tokenizer(chat: bool):
    """A small byte-level BPE tokenizer (BOS <s>, EOS </s>), with a chat template that
    renders each message as <role>content<eot> when chat."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["hello world, wörld, the quick brown fox"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    if chat:
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>"
                             "{{ m['content'] }}<eot>{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok
