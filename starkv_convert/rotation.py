"""
Rotating the 4-bit latent channels of every block before they are quantized (incoherence processing).

A block's latents come out ordered by singular value, so within a scale group of its 4-bit channels a few large
channels set the group's scale and the small ones round to zero. An orthogonal rotation Q of those channels spreads
their energy evenly over all of them: the down-projection rows become Q A and the up-projection columns B Q^T, so
B Q^T Q A = B A and the model is unchanged at full precision, while the quantized latents lose far less (SmolLM2,
learned ranks at kv-ratio 0.5, every channel in 4 bits: perplexity 35.74 -> 33.24 against 32.13 unquantized). Nothing
changes at run time: the checkpoint stores the rotated factors, and its cache quantizes what they produce. The 8-bit
channels (a block's first n8) are not rotated: their rounding error is small already (mixed splits measured the same).

Q is block-diagonal: the 4-bit channels in chunks of up to CHUNK, each turned by a random orthogonal matrix drawn from
a generator seeded with the chunk's size (the same for every chunk of that size). So `--kv-bits auto`, which measures
every split of every block with its own rotation, costs O(CHUNK) more per latent value instead of O(rank), and at most
CHUNK matrices are ever made. Every block of SmolLM2 and of Llama's key heads fits in one chunk.
"""

from functools import cache

import torch

from .ranks import RankPlan

CHUNK = 256  # most 4-bit channels one orthogonal matrix turns together


@cache
def _chunk_rotation(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # (the sign fix makes Q unique for the drawn matrix)


def tail_chunks(size: int) -> list[int]:
    """The chunk sizes that `size` 4-bit channels are turned in (none for fewer than 2 channels)."""
    if size < 2:
        return []
    return [CHUNK] * (size // CHUNK) + ([size % CHUNK] if size % CHUNK else [])


def tail_rotation(size: int) -> torch.Tensor:
    """The orthogonal (size, size) float64 rotation of `size` 4-bit channels (block-diagonal over `tail_chunks`)."""
    chunks = tail_chunks(size)
    if not chunks:
        return torch.eye(size, dtype=torch.float64)
    return torch.block_diag(*(_chunk_rotation(n) if n > 1 else torch.ones(1, 1, dtype=torch.float64) for n in chunks))


def _turn(x: torch.Tensor, n8: int, transpose: bool) -> torch.Tensor:
    """x (..., rank) with each chunk of channels n8.. multiplied by its Q^T (rows rotate) or Q (rows turn back)."""
    parts, start = [x[..., :n8]], n8
    for n in tail_chunks(x.shape[-1] - n8):
        q = _chunk_rotation(n).to(x.device, x.dtype) if n > 1 else None
        chunk = x[..., start : start + n]
        parts.append(chunk if q is None else chunk @ (q.T if transpose else q))
        start += n
    return torch.cat(parts, dim=-1) if len(parts) > 1 else x


def rotate_rows(z: torch.Tensor, n8: int) -> torch.Tensor:
    """Latents (..., rank) with their channels n8.. rotated, as the rotated down-projection produces them."""
    return _turn(z, n8, transpose=True)


def unrotate_rows(z: torch.Tensor, n8: int) -> torch.Tensor:
    """The inverse of `rotate_rows`."""
    return _turn(z, n8, transpose=False)


def rotate_block(down: torch.Tensor, up: torch.Tensor, start: int, rank: int, n8: int) -> None:
    """
    Rotates the 4-bit channels start + n8 .. start + rank of a block in place: rows of `down` (rank, in) become Q A,
    columns of `up` (out, rank) become B Q^T. Computed in float64 and cast back to the tensors' dtype.
    """
    if rank - n8 < 2:
        return
    q = tail_rotation(rank - n8).to(down.device)
    rows = slice(start + n8, start + rank)
    down[rows] = (q @ down[rows].double()).to(down.dtype)
    up[:, rows] = (up[:, rows].double() @ q.T).to(up.dtype)


def rotates_any(plan: RankPlan, kv_quant: dict) -> bool:
    """Whether some block of the plan has at least two 4-bit channels (something to rotate)."""
    blocks = [
        (r, n)
        for k, v, k_n8, v_n8 in zip(plan.k, plan.v, kv_quant["k_n8"], kv_quant["v_n8"])
        if k is not None
        for r, n in [*zip(k, k_n8), (v, v_n8)]
    ]
    return any(r - n >= 2 for r, n in blocks)


@torch.no_grad()
def rotate_4bit_channels(state: dict[str, torch.Tensor], plan: RankPlan, kv_quant: dict) -> None:
    """
    Rotates every block's 4-bit channels (those past its `kv_quant` n8) in a converted state dict, in place: each
    compressed layer's k_a_proj / k_b_proj per key head and v_a_proj / v_b_proj. (The converter rotates its fp32
    factors instead, before they are cast: `build.latent_state_dict`.)
    """
    for layer, k_ranks in enumerate(plan.k):
        if k_ranks is None:
            continue
        prefix = f"model.layers.{layer}.self_attn."
        down, up = state[prefix + "k_a_proj.weight"].clone(), state[prefix + "k_b_proj.weight"].clone()
        start = 0
        for rank, n8 in zip(k_ranks, kv_quant["k_n8"][layer]):
            rotate_block(down, up, start, rank, n8)
            start += rank
        state[prefix + "k_a_proj.weight"], state[prefix + "k_b_proj.weight"] = down, up
        down, up = state[prefix + "v_a_proj.weight"].clone(), state[prefix + "v_b_proj.weight"].clone()
        rotate_block(down, up, 0, plan.v[layer], kv_quant["v_n8"][layer])
        state[prefix + "v_a_proj.weight"], state[prefix + "v_b_proj.weight"] = down, up
