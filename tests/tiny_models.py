"""Tiny random models of every supported family, big enough that a cache's per-token bytes dwarf its bookkeeping."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]

_COMMON = dict(
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    eos_token_id=0,
    pad_token_id=0,
    bos_token_id=None,
    tie_word_embeddings=False,
    initializer_range=0.08,  # peaked logits: greedy choices are not near-ties
)


def tiny_config(family: str, vocab_size: int):
    """
    The config of a tiny `family` model: llama3 has "llama3" RoPE scaling, mistral a sliding window; "llama-mha" (not
    in FAMILIES) is llama with a KV head per query head.
    """
    kwargs = dict(_COMMON, vocab_size=vocab_size)
    if family == "llama":
        return AutoConfig.for_model("llama", rope_theta=10000.0, **kwargs)
    if family == "llama-mha":
        return AutoConfig.for_model("llama", rope_theta=10000.0, **dict(kwargs, num_key_value_heads=8))
    if family == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return AutoConfig.for_model("llama", rope_parameters=rope, **kwargs)
    if family == "mistral":
        return AutoConfig.for_model("mistral", sliding_window=24, **kwargs)
    if family == "qwen2":
        return AutoConfig.for_model(
            "qwen2",
            use_sliding_window=False,
            tie_word_embeddings=True,
            **{k: v for k, v in kwargs.items() if k != "tie_word_embeddings"},
        )
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", **kwargs)
    raise ValueError(family)


def make_base_model(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialized fp32 model; biases (Qwen2) are made non-zero so that they matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()
