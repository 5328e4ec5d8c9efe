"""
The math of STAR-KV attention in plain PyTorch: rebuild keys and values from their latents, and attend over cached
latents with the values aggregated in latent space. The model uses these functions on every device; the Triton
kernels are tested against them.
"""

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (transformers' RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `x` (..., d) by the RoPE angles whose cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin


def rebuild_keys(
    key_latents: torch.Tensor,
    up_weight: torch.Tensor,
    ranks: list[int],
    bias: torch.Tensor | None = None,
    norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """
    Keys before RoPE from their latents: head `j` is `up_weight[:, offset_j : offset_j + ranks[j]] @ z_j + bias_j`,
    then the per-head norm if the model has one (Qwen3).

    Args:
        key_latents: (batch, tokens, sum(ranks)), the latents of all KV heads side by side.
        up_weight: (head_dim, sum(ranks)), each head's up-projection in its own column block.
        ranks: key rank of each KV head.
        bias: (num_kv_heads * head_dim) key bias, or None.
        norm: module applied over head_dim, or None.

    Returns:
        (batch, num_kv_heads, tokens, head_dim)
    """
    latents = key_latents.split(ranks, dim=-1)
    weights = up_weight.split(ranks, dim=-1)
    keys = torch.stack([F.linear(z, w) for z, w in zip(latents, weights)], dim=1)
    if bias is not None:
        keys = keys + bias.view(len(ranks), 1, -1)
    if norm is not None:
        keys = norm(keys)
    return keys


def rebuild_values(
    value_latents: torch.Tensor, up_weight: torch.Tensor, bias: torch.Tensor | None, num_kv_heads: int
) -> torch.Tensor:
    """Values (batch, num_kv_heads, tokens, head_dim) from the joint latents (batch, tokens, rank)."""
    batch, tokens, _ = value_latents.shape
    values = F.linear(value_latents, up_weight, bias)
    return values.view(batch, tokens, num_kv_heads, -1).transpose(1, 2)


def latent_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    value_latents: torch.Tensor,
    value_up_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """
    Attention with values aggregated in latent space: for query head i of KV head j with weights p over the cached
    tokens, `o_i = B_j (sum_t p_t z_t) + b_j`. The value up-projection runs once per query, never per cached token.

    Args:
        query: (batch, num_heads, q_len, head_dim), rotated.
        keys: (batch, num_kv_heads, tokens, head_dim), rebuilt and rotated.
        value_latents: (batch, tokens, rank).
        value_up_weight: (num_kv_heads * head_dim, rank).
        value_bias: (num_kv_heads * head_dim) or None.
        attention_mask: (batch, 1, q_len, tokens), bool (True attends) or additive float; None attends everywhere.
        scaling: softmax scale.

    Returns:
        (batch, q_len, num_heads, head_dim)
    """
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, tokens = keys.shape[1], keys.shape[2]
    groups = num_heads // num_kv_heads
    scores = torch.matmul(query.view(batch, num_kv_heads, groups * q_len, head_dim), keys.transpose(-1, -2))
    scores = scores.float().view(batch, num_kv_heads, groups, q_len, tokens) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, None, -q_len:, -tokens:]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value_latents.dtype)
    aggregated = torch.matmul(probs.view(batch, num_heads * q_len, tokens), value_latents)
    up = value_up_weight.view(num_kv_heads, head_dim, -1).transpose(1, 2)
    out = torch.matmul(aggregated.view(batch, num_kv_heads, groups * q_len, -1), up)
    if value_bias is not None:
        out = out + value_bias.view(num_kv_heads, 1, head_dim)
    return out.view(batch, num_heads, q_len, head_dim).transpose(1, 2)
