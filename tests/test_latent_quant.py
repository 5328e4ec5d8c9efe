"""Mixed-precision latent quantization (the reference the cache and kernels will share): exact packing, error within
half a quantization step, the byte count it claims, and no NaN or division by zero on all-zero groups."""

import pytest
import torch

from starkv_convert.remote_code import import_remote

quant = import_remote("latent_quant")


def test_int4_packing_is_exact_for_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:45].view(1, 45)  # odd length
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 23)
    assert torch.equal(quant.unpack_int4(packed, 45), codes)


@pytest.mark.parametrize("rank, n8, group", [(38, 12, 32), (37, 0, 16), (5, 5, 32), (70, 33, 8), (1, 0, 32)])
def test_round_trip_error_is_within_half_a_step(rank, n8, group):
    g = torch.Generator().manual_seed(rank)
    spread = torch.logspace(1, -2, rank)  # leading channels larger, as singular-value order gives
    z = torch.randn(3, 7, rank, generator=g) * spread
    q = quant.quantize_latents(z, n8, group)
    back = quant.dequantize_latents(q)
    assert back.shape == z.shape and torch.isfinite(back).all()
    step8 = quant._expand(q.scales8, group, n8)
    step4 = quant._expand(q.scales4, group, rank - n8)
    step = torch.cat((step8, step4), dim=-1)
    assert ((back - z).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all()
    # 8 bits are far more precise than 4 on the same data
    if 0 < n8 < rank:
        z8 = quant.dequantize_latents(quant.quantize_latents(z, rank, group))
        assert (z8 - z).abs().mean() < (back - z).abs().mean()


@pytest.mark.parametrize("rank, n8, group", [(38, 12, 32), (37, 0, 16), (512, 128, 32)])
def test_bytes_per_token_match_the_tensors(rank, n8, group):
    tokens = 11
    q = quant.quantize_latents(torch.randn(tokens, rank), n8, group)
    assert q.nbytes() == tokens * quant.quantized_bytes_per_token(rank, n8, group)
    assert quant.quantized_bytes_per_token(rank, n8, group) < 2 * rank  # smaller than bf16


def test_zero_groups_and_extremes():
    z = torch.zeros(2, 40)
    z[1, :8] = torch.tensor([1e4, -1e4, 3.0, 0, 0, 0, 0, 0])
    back = quant.dequantize_latents(quant.quantize_latents(z, 8, 16))
    assert torch.isfinite(back).all()
    assert back[0].abs().max() == 0  # all-zero tokens stay zero
    assert back[1, 0] == pytest.approx(1e4, rel=1e-3) and back[1, 1] == pytest.approx(-1e4, rel=1e-3)


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="n8"):
        quant.quantize_latents(torch.randn(2, 8), 9)


def test_codec_rows_round_trip_ragged_blocks():
    codec = quant.LatentCodec([38, 5, 17], [10, 0, 17], group=16)
    z = torch.randn(2, 9, 60)
    rows = codec.encode(z)
    assert rows.dtype == torch.uint8 and rows.shape == (2, 9, codec.bytes_per_token)
    back = codec.decode(rows, torch.float32)
    expected = torch.cat(
        [
            quant.dequantize_latents(quant.quantize_latents(b, n8, 16))
            for b, n8 in zip(z.split([38, 5, 17], dim=-1), [10, 0, 17])
        ],
        dim=-1,
    )
    assert torch.equal(back, expected)
    assert torch.equal(codec.decode(rows[:, 3:5], torch.float32), expected[:, 3:5])  # rows are per token
    with pytest.raises(ValueError):
        quant.LatentCodec([4], [5], 32)


@pytest.mark.parametrize("align", [1, 4, 16])
def test_codec_rows_are_aligned_and_padded_with_zeros(align):
    """Each block's codes start at a multiple of `align` bytes, all scales follow 2-byte aligned, the row length is a
    multiple of `align`; only codes and scales are nonzero, and the row costs at most the alignment over its parts."""
    ranks, n8, group = [38, 5, 17, 32], [10, 0, 17, 0], 16
    codec = quant.LatentCodec(ranks, n8, group, align=align)
    assert all(offset % align == 0 for offset in codec.code_offsets)
    assert all(offset % 2 == 0 for offset in codec.scale_offsets) and codec.bytes_per_token % max(align, 2) == 0
    assert codec.scale_offsets[0] >= codec.code_offsets[-1] + codec.code_sizes[-1]
    parts = sum(quant.quantized_bytes_per_token(r, a, group) for r, a in zip(ranks, n8))
    assert parts <= codec.bytes_per_token <= parts + len(ranks) * (align - 1) + max(align, 2)
    rows = codec.encode(torch.randn(3, 5, sum(ranks)) * 100)
    pad = codec.padding()
    assert rows[..., pad].eq(0).all() and len(pad) == codec.bytes_per_token - parts
    if align == 1:
        assert codec.bytes_per_token - parts <= 1  # (the scales' 2-byte alignment)
    # every part sits where the codec says: the scales of block 3 are those quantize_latents gives
    z = torch.randn(4, sum(ranks))
    q = quant.quantize_latents(z.split(ranks, dim=-1)[3], 0, group)
    at = codec.scale_offsets[3]
    assert torch.equal(codec.encode(z)[:, at : at + 4], q.scales4.view(torch.uint8))
