"""
Rotating the 4-bit latent channels of every block before they are quantized (incoherence processing).

A block's latents come out ordered by singular value, so within a scale group of its 4-bit channels a few large
channels set the group's scale and the small ones round to zero. An orthogonal rotation Q of those channels spreads
their energy evenly over all of them: the down-projection rows become Q A and the up-projection columns B Q^T, so
B Q^T Q A = B A and the model is unchanged at full precision, while the quantized latents lose far less (SmolLM2,
energy ranks at kv-ratio 0.5, every channel in 4 bits: perplexity 49.4 -> 44.1 against 42.3 unquantized). Nothing
changes at run time: the checkpoint stores the rotated factors, and its cache quantizes what they produce. The 8-bit
leading channels are not rotated (their rounding error is small already; mixed splits measured the same).

Q is a random orthogonal matrix drawn from a generator seeded with its size, the same for every block of that size.
"""

from functools import cache

import torch

from .ranks import RankPlan


@cache
def tail_rotation(size: int) -> torch.Tensor:
    """The fixed orthogonal (size, size) float64 rotation of `size` 4-bit channels (made once per size; read only)."""
    generator = torch.Generator().manual_seed(size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # (the sign fix makes Q unique for the drawn matrix)


def rotate_rows(z: torch.Tensor, n8: int) -> torch.Tensor:
    """Latents (..., rank) with their channels n8.. rotated as the rotated down-projection produces them."""
    if z.shape[-1] - n8 < 2:
        return z
    tail = z[..., n8:] @ tail_rotation(z.shape[-1] - n8).to(z.device, z.dtype).T
    return torch.cat([z[..., :n8], tail], dim=-1)


def unrotate_rows(z: torch.Tensor, n8: int) -> torch.Tensor:
    """The inverse of `rotate_rows`."""
    if z.shape[-1] - n8 < 2:
        return z
    tail = z[..., n8:] @ tail_rotation(z.shape[-1] - n8).to(z.device, z.dtype)
    return torch.cat([z[..., :n8], tail], dim=-1)


def _rotate_block(down: torch.Tensor, up: torch.Tensor, start: int, rank: int, n8: int) -> None:
    """Rotates channels start + n8 .. start + rank of a block in place: rows of `down`, columns of `up`."""
    if rank - n8 < 2:
        return
    q = tail_rotation(rank - n8).to(down.device)
    rows = slice(start + n8, start + rank)
    down[rows] = (q @ down[rows].double()).to(down.dtype)
    up[:, rows] = (up[:, rows].double() @ q.T).to(up.dtype)


@torch.no_grad()
def rotate_4bit_channels(state: dict[str, torch.Tensor], plan: RankPlan, kv_quant: dict) -> None:
    """
    Rotates every block's 4-bit channels (those past its `kv_quant` n8) in a converted state dict, in place: each
    compressed layer's k_a_proj / k_b_proj per key head and v_a_proj / v_b_proj.
    """
    for layer, k_ranks in enumerate(plan.k):
        if k_ranks is None:
            continue
        prefix = f"model.layers.{layer}.self_attn."
        down, up = state[prefix + "k_a_proj.weight"].clone(), state[prefix + "k_b_proj.weight"].clone()
        start = 0
        for rank, n8 in zip(k_ranks, kv_quant["k_n8"][layer]):
            _rotate_block(down, up, start, rank, n8)
            start += rank
        state[prefix + "k_a_proj.weight"], state[prefix + "k_b_proj.weight"] = down, up
        down, up = state[prefix + "v_a_proj.weight"].clone(), state[prefix + "v_b_proj.weight"].clone()
        _rotate_block(down, up, 0, plan.v[layer], kv_quant["v_n8"][layer])
        state[prefix + "v_a_proj.weight"], state[prefix + "v_b_proj.weight"] = down, up
