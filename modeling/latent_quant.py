"""
Mixed-precision quantization of cached latents (METHOD.md section 3), in plain PyTorch.

A block's latents (one KV head's keys, or one layer's values) come out ordered by singular value, so their spread
falls with the channel index. The leading `n8` channels are stored as int8, the rest as int4 packed two per byte;
each token has one fp16 scale per group of `group` channels (symmetric: scale = max |z| / qmax over the group).
The converter, the cache and the kernels' references all use these functions.
"""

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass
class QuantizedLatents:
    """Latents (..., rank) as codes and scales; `n8` leading channels in 8 bits, the rest in 4."""

    codes8: torch.Tensor  # (..., n8) int8
    scales8: torch.Tensor  # (..., ceil(n8 / group)) fp16
    packed4: torch.Tensor  # (..., ceil(n4 / 2)) uint8: channel 2i in the low nibble, 2i + 1 in the high one
    scales4: torch.Tensor  # (..., ceil(n4 / group)) fp16
    rank: int
    group: int

    @property
    def n8(self) -> int:
        return self.codes8.shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes8, self.scales8, self.packed4, self.scales4))


def quantized_bytes_per_token(rank: int, n8: int, group: int) -> int:
    """Bytes one token's latents of a block take: codes plus fp16 scales."""
    n4 = rank - n8
    return n8 + (n4 + 1) // 2 + 2 * (-(-n8 // group) + -(-n4 // group))


def _group_scales(z: torch.Tensor, group: int, qmax: int) -> torch.Tensor:
    """Per-token, per-group scales (..., ceil(n / group)) as stored (fp16, never 0)."""
    n = z.shape[-1]
    padded = torch.nn.functional.pad(z.abs(), (0, -n % group))
    peak = padded.view(*z.shape[:-1], -1, group).amax(dim=-1)
    tiny = torch.finfo(SCALE_DTYPE).tiny
    return (peak / qmax).clamp_min(tiny).to(SCALE_DTYPE)


def _expand(scales: torch.Tensor, group: int, n: int) -> torch.Tensor:
    return scales.float().repeat_interleave(group, dim=-1)[..., :n]


def _quantize(z: torch.Tensor, group: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    scales = _group_scales(z, group, qmax)
    codes = torch.round(z.float() / _expand(scales, group, z.shape[-1])).clamp_(-qmax, qmax)
    return codes.to(torch.int8), scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] (..., n) -> uint8 (..., ceil(n / 2)), two per byte (offset by 8)."""
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    nibbles = torch.nn.functional.pad(nibbles, (0, nibbles.shape[-1] % 2), value=8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 (..., ceil(n / 2)) -> int8 codes (..., n)."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :n]


def quantize_latents(z: torch.Tensor, n8: int, group: int = 32) -> QuantizedLatents:
    """Quantizes latents (..., rank): the leading `n8` channels to int8, the others to int4, per-token group scales."""
    rank = z.shape[-1]
    if not 0 <= n8 <= rank:
        raise ValueError(f"n8={n8} must be in [0, {rank}]")
    codes8, scales8 = _quantize(z[..., :n8], group, 127)
    codes4, scales4 = _quantize(z[..., n8:], group, 7)
    return QuantizedLatents(codes8, scales8, pack_int4(codes4), scales4, rank, group)


def dequantize_latents(q: QuantizedLatents, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latents (..., rank) in `dtype` from their codes and scales."""
    n4 = q.rank - q.n8
    high = q.codes8.float() * _expand(q.scales8, q.group, q.n8)
    low = unpack_int4(q.packed4, n4).float() * _expand(q.scales4, q.group, n4)
    return torch.cat((high, low), dim=-1).to(dtype)


def _as(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A slice of uint8 rows reinterpreted as `dtype` (copied first: views need an aligned, offset-free tensor)."""
    if part.shape[-1] == 0:
        return torch.empty(*part.shape[:-1], 0, dtype=dtype, device=part.device)
    return part.clone(memory_format=torch.contiguous_format).view(dtype)


class LatentCodec:
    """
    Stores the latents of consecutive blocks (..., sum(ranks)) as one uint8 row per token: per block its int8 codes,
    packed int4 codes, then the fp16 scales of both parts. A cache that keeps these rows on its token axis can
    concatenate, crop, reorder and select them like any tensor.
    """

    def __init__(self, ranks: list[int], n8: list[int], group: int):
        if len(ranks) != len(n8) or not all(0 <= a <= r for a, r in zip(n8, ranks)):
            raise ValueError(f"8-bit channels {n8} do not fit the ranks {ranks}")
        self.ranks, self.n8, self.group = list(ranks), list(n8), group
        self.sizes = [quantized_bytes_per_token(r, a, group) for r, a in zip(ranks, n8)]

    @property
    def bytes_per_token(self) -> int:
        return sum(self.sizes)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(..., sum(ranks)) -> (..., bytes_per_token) uint8."""
        parts = []
        for block, n8 in zip(z.split(self.ranks, dim=-1), self.n8):
            q = quantize_latents(block, n8, self.group)
            parts += [q.codes8.view(torch.uint8), q.packed4, q.scales8.view(torch.uint8), q.scales4.view(torch.uint8)]
        return torch.cat(parts, dim=-1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., bytes_per_token) uint8 -> (..., sum(ranks)) latents in `dtype`."""
        blocks = []
        for row, rank, n8 in zip(rows.split(self.sizes, dim=-1), self.ranks, self.n8):
            n4, group = rank - n8, self.group
            widths = [n8, (n4 + 1) // 2, 2 * -(-n8 // group), 2 * -(-n4 // group)]
            codes8, packed4, scales8, scales4 = row.split(widths, dim=-1)
            q = QuantizedLatents(
                _as(codes8, torch.int8), _as(scales8, SCALE_DTYPE), packed4, _as(scales4, SCALE_DTYPE), rank, group
            )
            blocks.append(dequantize_latents(q, dtype))
        return torch.cat(blocks, dim=-1)
