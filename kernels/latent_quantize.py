"""
Quantizing new latents into a `LatentCodec`'s uint8 rows in one Triton launch per layer: the same bytes as
`LatentCodec.encode`, without its dozens of small PyTorch ops per block.

A token's row holds (`LatentCodec`), per block at its code offset: the int8 codes of its leading n8 channels, then
its int4 codes two per byte (channel 2i in the low nibble, 2i + 1 in the high one, offset by 8; an odd last channel
is paired with the pad nibble 8); and per block at its scale offset, past every block's codes: the fp16 scales of its
8-bit groups followed by those of its 4-bit groups (groups of `group` channels counted from the start of each part),
each written as two bytes. The bytes between those parts are zero.

`_quantize_kernel`, one program per (tile of BT tokens, block), reads the block's rank, n8, column and byte offsets
from a small int32 table (made once per codec and device) and walks its groups, 8-bit ones first, NG at a time. A
tile is (BT tokens, NG groups, HG pairs of channels): pairs because the two channels of a packed byte always share
a group when the group size is even (odd group sizes, which the converter never makes, go through `codec.encode`).

Exactness: the max |z| of a group is exact in any dtype; the scale is then computed as torch computes it on that
device (a correctly rounded fp32 division by qmax on the CPU, a product with the fp32 reciprocal of qmax on CUDA,
where torch turns the division by a Python number into one), rounded to the input dtype, clamped to the smallest
normal fp16 and rounded to fp16. Codes use an IEEE division (`div_rn`: Triton's `/` is approximate on GPUs) and an
exact round-half-to-even from `floor` (libdevice's rint does not run in the interpreter).
"""

import math

import torch

from .latent_decode import _cdiv, _pow2_at_least, use_decode_kernel
from .latent_quant import LatentCodec

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs no triton
    triton = None

PAIRS_PER_TILE = 1024  # BT * NG * HG: pairs of channels a program holds at once


def use_quantize_kernel(device: torch.device) -> bool:
    """
    Whether new latents are quantized by the Triton kernel: where the decode kernel runs (CUDA with triton, or
    STARKV_DECODE_KERNEL=triton). On the H100 its rows equal `LatentCodec.encode` byte for byte.
    """
    return use_decode_kernel(device)


def encode_latents(codec: LatentCodec, z: torch.Tensor) -> torch.Tensor:
    """`codec.encode(z)`, through the kernel where `use_quantize_kernel` says so."""
    return quantize_rows(z, codec) if use_quantize_kernel(z.device) else codec.encode(z)


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        """torch.round of fp32 values below 2**31 in size, as int32: exact on every backend and in the interpreter."""
        below = tl.floor(x)
        frac = x - below  # exact
        below = below.to(tl.int32)
        return below + ((frac > 0.5) | ((frac == 0.5) & ((below & 1) == 1))).to(tl.int32)

    @triton.jit
    def _round_to_bf16(x):
        """fp32 -> the nearest bf16 (ties to even), as fp32, from the bits: the interpreter's cast truncates."""
        bits = x.to(tl.uint32, bitcast=True)
        return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize_kernel(
        Z, OUT, BLOCKS, PAD, tokens, stride_z, stride_o,
        GROUP: tl.constexpr, BT: tl.constexpr, NG: tl.constexpr, HG: tl.constexpr, RECIPROCAL: tl.constexpr,
        NPAD: tl.constexpr,
    ):  # fmt: skip
        """
        One block's bytes of BT tokens' rows. BLOCKS: (blocks, 5) int32 rank, n8, column in z, code byte and scale
        byte in the row. The programs of block 0 also zero the row's NPAD padding bytes (their offsets: PAD).
        """
        block = BLOCKS + 5 * tl.program_id(1)
        rank = tl.load(block)
        n8 = tl.load(block + 1)
        n4 = rank - n8
        groups8 = (n8 + GROUP - 1) // GROUP
        groups = groups8 + (n4 + GROUP - 1) // GROUP
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        tok_ok = (t < tokens)[:, None, None]
        z_row = t.to(tl.int64)[:, None, None] * stride_z + tl.load(block + 2)
        row = t.to(tl.int64)[:, None] * stride_o
        out_row = row + tl.load(block + 3)  # the block's first code byte
        scales = row + tl.load(block + 4)  # its first scale's byte
        if NPAD > 0:
            if tl.program_id(1) == 0:
                at = tl.load(PAD + tl.arange(0, NPAD))[None, :]  # (-1: none)
                tl.store(OUT + row + at, tl.zeros([BT, NPAD], tl.uint8), mask=(t < tokens)[:, None] & (at >= 0))
        pair = tl.arange(0, HG)[None, :]
        for first in range(0, groups, NG):
            g = first + tl.arange(0, NG)
            is8 = (g < groups8)[:, None]
            # channel lo = 2 pair and lo + 1 of group g, counted from the start of its part (NG, HG)
            lo = tl.where(is8, g[:, None], g[:, None] - groups8) * GROUP + 2 * pair
            size = tl.where(is8, n8, n4)
            lo_ok = (g < groups)[:, None] & (2 * pair < GROUP) & (lo < size)
            hi_ok = lo_ok & (lo + 1 < size)
            z_lo_ptr = Z + z_row + tl.where(is8, lo, n8 + lo)[None]
            z_lo = tl.load(z_lo_ptr, mask=tok_ok & lo_ok[None], other=0.0)
            z_hi = tl.load(z_lo_ptr + 1, mask=tok_ok & hi_ok[None], other=0.0)

            qmax = tl.where(g < groups8, 127.0, 7.0)[None, :]  # (1, NG)
            peak = tl.max(tl.maximum(tl.abs(z_lo), tl.abs(z_hi)), axis=2).to(tl.float32)  # (BT, NG), exact
            if RECIPROCAL:  # torch on CUDA: peak * fp32(1 / qmax)
                scale = peak * tl.where(g < groups8, 1.0 / 127.0, 1.0 / 7.0)[None, :]
            else:
                scale = tl.math.div_rn(peak, qmax)
            if Z.dtype.element_ty == tl.bfloat16:  # rounded to the input dtype, as torch divides in it
                scale = _round_to_bf16(scale)
            else:
                scale = scale.to(Z.dtype.element_ty).to(tl.float32)
            scale = tl.maximum(scale, 6.103515625e-05)  # fp16's smallest normal, 2**-14: groups of zeros too
            scale = scale.to(tl.float16)
            bits = scale.to(tl.uint16, bitcast=True)
            at = scales + 2 * g[None, :]
            scale_ok = (t < tokens)[:, None] & (g < groups)[None, :]
            tl.store(OUT + at, (bits & 255).to(tl.uint8), mask=scale_ok)
            tl.store(OUT + at + 1, (bits >> 8).to(tl.uint8), mask=scale_ok)

            step = scale.to(tl.float32)[:, :, None]
            qmax = qmax[:, :, None]
            x_lo = tl.math.div_rn(z_lo.to(tl.float32), step)
            x_hi = tl.math.div_rn(z_hi.to(tl.float32), step)
            code_lo = _round_half_even(tl.minimum(tl.maximum(x_lo, -qmax), qmax))
            code_hi = _round_half_even(tl.minimum(tl.maximum(x_hi, -qmax), qmax))  # 0 (pad nibble 8) past the end
            packed = (code_lo + 8) | ((code_hi + 8) << 4)
            tl.store(
                OUT + out_row[:, :, None] + tl.where(is8, lo, n8 + lo // 2)[None],
                tl.where(is8[None], code_lo & 255, packed).to(tl.uint8),
                mask=tok_ok & lo_ok[None],
            )
            tl.store(
                OUT + out_row[:, :, None] + lo[None] + 1,
                (code_hi & 255).to(tl.uint8),
                mask=tok_ok & (hi_ok & is8)[None],
            )


def _alloc(*shape: int, device: torch.device) -> torch.Tensor:
    """The output rows (uint8); tests replace this to poison them."""
    return torch.empty(*shape, dtype=torch.uint8, device=device)


_BLOCK_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _block_tables(codec: LatentCodec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """
    int32 tables on `device`, made once per codec: (blocks, 5) each block's rank, 8-bit channels, first column in z,
    first code byte and first scale byte in the row; the row's padding bytes (-1 filling a power of two); and the
    length of that table, or 0 where the row has no padding.
    """
    key = (tuple(codec.ranks), tuple(codec.n8), codec.group, codec.align, str(device))
    if key not in _BLOCK_TABLES:
        rows = [
            [rank, n8, sum(codec.ranks[:j]), codec.code_offsets[j], codec.scale_offsets[j]]
            for j, (rank, n8) in enumerate(zip(codec.ranks, codec.n8))
        ]
        pad = codec.padding()
        pad += [-1] * (_pow2_at_least(len(pad)) - len(pad) if pad else 0)
        _BLOCK_TABLES[key] = (
            torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 5),
            torch.tensor(pad or [-1], dtype=torch.int32, device=device),
            len(pad),
        )
    return _BLOCK_TABLES[key]


def quantize_rows(z: torch.Tensor, codec: LatentCodec) -> torch.Tensor:
    """
    `codec.encode(z)` in one launch: latents (..., sum(codec.ranks)) in fp32, fp16 or bf16 -> their rows
    (..., codec.bytes_per_token) uint8, byte for byte. Odd group sizes fall back to `codec.encode`.
    """
    width = sum(codec.ranks)
    if z.shape[-1] != width:
        raise ValueError(f"latents of {z.shape[-1]} channels for a codec of {width}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"latents in {z.dtype}: the kernel takes fp32, fp16 or bf16")
    if codec.group % 2:
        return codec.encode(z)
    if triton is None:
        raise RuntimeError("quantize_rows needs triton: pip install triton")
    lead = z.shape[:-1]
    flat = z.reshape(math.prod(lead), width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tokens, row_bytes = flat.shape[0], codec.bytes_per_token
    out = _alloc(tokens, row_bytes, device=z.device)
    if tokens and row_bytes:
        pairs = _pow2_at_least(codec.group // 2)
        groups = max(-(-n8 // codec.group) + -(-(r - n8) // codec.group) for r, n8 in zip(codec.ranks, codec.n8))
        tile_tokens = min(16, _pow2_at_least(tokens))
        tile_groups = min(_pow2_at_least(groups), max(1, PAIRS_PER_TILE // (tile_tokens * pairs)))
        blocks, pad, npad = _block_tables(codec, z.device)
        _quantize_kernel[(_cdiv(tokens, tile_tokens), len(codec.ranks))](
            flat, out, blocks, pad, tokens, flat.stride(0), out.stride(0),
            GROUP=codec.group, BT=tile_tokens, NG=tile_groups, HG=pairs, RECIPROCAL=z.device.type == "cuda",
            NPAD=npad,
        )  # fmt: skip
    return out.view(*lead, row_bytes)


__all__ = ["encode_latents", "quantize_rows", "use_quantize_kernel"]
