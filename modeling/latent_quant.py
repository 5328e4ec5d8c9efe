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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


ROW_ALIGN = 4  # bytes: where each block's codes start, and the row length (the decode kernel's loads then vectorize)


def row_align(kv_quant: dict) -> int:
    """
    The cache rows' alignment (bytes) of a config's `kv_quant`: its "align", which conversions always write, or 1 for
    configs from before the key existed (their cards state the bytes of compact rows).
    """
    return kv_quant.get("align", 1)


def quantized_bytes_per_token(rank: int, n8: int, group: int, align: int = 1) -> int:
    """
    Bytes one token's latents of a block take: codes plus fp16 scales; with `align`, its codes padded to a multiple
    of it, as a `LatentCodec` row holds them (the row then rounds its total up to `align`).
    """
    n4 = rank - n8
    return _round_up(n8 + (n4 + 1) // 2, align) + 2 * (-(-n8 // group) + -(-n4 // group))


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
    Stores the latents of consecutive blocks (..., sum(ranks)) as one uint8 row per token. The row holds every
    block's codes first, each block's at a multiple of `align` bytes (its int8 codes, then its int4 codes two per
    byte), then the fp16 scales of every block (per block its 8-bit groups' then its 4-bit groups'), 2-byte aligned;
    the row length is a multiple of `align` and the bytes between parts are zero. Aligned codes and scales let a
    kernel read them in whole words. A cache that keeps these rows on its token axis can concatenate, crop, reorder
    and select them like any tensor.
    """

    def __init__(self, ranks: list[int], n8: list[int], group: int, align: int = ROW_ALIGN):
        if len(ranks) != len(n8) or not all(0 <= a <= r for a, r in zip(n8, ranks)):
            raise ValueError(f"8-bit channels {n8} do not fit the ranks {ranks}")
        if align not in (1, 2, 4, 8, 16):
            raise ValueError(f"row alignment {align}: use 1, 2, 4, 8 or 16 bytes")
        self.ranks, self.n8, self.group, self.align = list(ranks), list(n8), group, align
        self.code_sizes = [a + (r - a + 1) // 2 for r, a in zip(ranks, n8)]
        self.scale_counts = [-(-a // group) + -(-(r - a) // group) for r, a in zip(ranks, n8)]
        self.code_offsets = [sum(_round_up(c, align) for c in self.code_sizes[:j]) for j in range(len(ranks))]
        scales_at = _round_up(sum(_round_up(c, align) for c in self.code_sizes), max(align, 2))
        self.scale_offsets = [scales_at + 2 * sum(self.scale_counts[:j]) for j in range(len(ranks))]
        self.bytes_per_token = _round_up(scales_at + 2 * sum(self.scale_counts), max(align, 2))

    def padding(self) -> list[int]:
        """The byte offsets of a row that hold neither codes nor scales (zero in every row)."""
        used = set()
        for code, size, scale, count in zip(self.code_offsets, self.code_sizes, self.scale_offsets, self.scale_counts):
            used.update(range(code, code + size))
            used.update(range(scale, scale + 2 * count))
        return [i for i in range(self.bytes_per_token) if i not in used]

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(..., sum(ranks)) -> (..., bytes_per_token) uint8."""
        rows = torch.zeros(*z.shape[:-1], self.bytes_per_token, dtype=torch.uint8, device=z.device)
        blocks = z.split(self.ranks, dim=-1)
        for block, n8, code, scale in zip(blocks, self.n8, self.code_offsets, self.scale_offsets):
            q = quantize_latents(block, n8, self.group)
            codes = torch.cat((q.codes8.view(torch.uint8), q.packed4), dim=-1)
            scales = torch.cat((q.scales8.view(torch.uint8), q.scales4.view(torch.uint8)), dim=-1)
            rows[..., code : code + codes.shape[-1]] = codes
            rows[..., scale : scale + scales.shape[-1]] = scales
        return rows

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., bytes_per_token) uint8 -> (..., sum(ranks)) latents in `dtype`."""
        blocks = []
        for rank, n8, code, scale in zip(self.ranks, self.n8, self.code_offsets, self.scale_offsets):
            n4, group = rank - n8, self.group
            groups8, groups4 = -(-n8 // group), -(-n4 // group)
            q = QuantizedLatents(
                _as(rows[..., code : code + n8], torch.int8),
                _as(rows[..., scale : scale + 2 * groups8], SCALE_DTYPE),
                rows[..., code + n8 : code + n8 + (n4 + 1) // 2],
                _as(rows[..., scale + 2 * groups8 : scale + 2 * (groups8 + groups4)], SCALE_DTYPE),
                rank,
                group,
            )
            blocks.append(dequantize_latents(q, dtype))
        return torch.cat(blocks, dim=-1)
