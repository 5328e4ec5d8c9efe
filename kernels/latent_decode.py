"""
Decode attention over a STAR-KV latent cache in Triton, and the plain PyTorch reference of the same math.

One decode query per sequence attends over cached key latents `z_k` (per-KV-head blocks of ragged rank) and joint
value latents `z_v`, flash-decoding style (the context is split over programs, then merged):

1. `_scores_kernel`, one program per (KV head, context split, sequence): rebuilds that head's keys from its latents
   with its up-projection on the tensor cores (+ bias, + Qwen3's k-norm), rotates them at their cached positions
   (RoPE from the model's cos/sin tables, held as fp16, else from `inv_freq`) and scores all G query heads together:
   one rebuild per KV head, never per query head. Scores go to a (B, Hq, T) buffer: fp32, or fp16 for 16-bit GQA
   inputs (half the bytes between the passes; the keys and queries they come from are 16-bit already). The head's
   rank is covered by two power-of-two column chunks (38 -> 32 + 16) read as 16-byte loads from the 8-aligned column
   at or before the head's offset (the up-projection rows outside the head are zero); its weights stay on the chip.
   For 16-bit latents a chunk's two RoPE halves are rebuilt side by side by one product, and the G queries are
   scored by one product over the head dimension (`joined_halves`); where their rows are 16-byte aligned, latents and
   tables arrive by TMA descriptors (`scores_tma`: ~30 fewer registers, the same results; where the descriptors' host
   time is hidden, and not under torch.compile). With one query head per KV head (G = 1, MHA), RoPE tables and
   quantized keys, keys are never rebuilt (`folded_scores`; on the H100 it pays for 4-bit codes, not for bf16
   latents): the query is folded into the up-projection once per program, as cos and sin weights of each latent
   channel, and per tile the fp16 tables times those weights (tensor cores) give each token's weight of each
   channel; the score is the codes' weighted sum, times their scales. Two KV heads share a program there (each tile's
   tables read once for both; the folded weights are small enough to keep both heads' on the chip).
2. `_values_kernel`, one program per (value-rank block, context split, sequence): an online softmax over the scores
   of every query head at once and the weighted sum of the value latents, so `z_v` is read once for all heads.
3. `_merge_kernel`, one program per (value-rank block, query head, sequence), combines the splits; the aggregated
   latent is up-projected once per query head (METHOD.md: values stay latent under the softmax).

Quantized latents (the codecs' uint8 rows) are dequantized as both passes read them: per scale group, from whole
code bytes and one fp16 scale per token and group (8-bit groups first, then 4-bit ones with two channels per byte),
or per value where groups are smaller than 32 channels or a key head has more than three groups.

A single fused pass over all KV heads (scores never leaving the chip) was measured slower than these two passes on
the H100 for every shape (benchmarks/README.md; it is in the history at commit 4f4226a), and so was the other way of
folding the query for G = 1 (latents times folded weights first, then 128 products with the fp32 tables a token: 8%
slower at MHA B16; commit 3b89296), and one kernel merging the splits and up-projecting them (15 us at GQA B1 16K
against 3.3 + 3.6; commit 4d3aa0f).

RoPE without tables: the angles of consecutive positions are built by angle addition from one exactly reduced angle
per tile (cos/sin of the offsets 0..BT-1 are computed once per program), so the special-function units stay idle; a
tile whose positions are not consecutive, and every fp32 call, takes the exact path (each angle reduced and
evaluated). The scores buffer adds 8 bytes per token and query head to the bytes read (4 where it is fp16).
"""

import os

import torch

from .latent_ops import apply_rope, latent_attention, rebuild_keys

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs no triton
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # (older triton: pointer loads only)
    TensorDescriptor = None


def use_decode_kernel(device: torch.device) -> bool:
    """
    Whether decode steps use the Triton kernel: by default on CUDA when triton is installed. The environment variable
    STARKV_DECODE_KERNEL=triton forces it (e.g. on CPU under TRITON_INTERPRET=1), =torch forces the PyTorch path.
    """
    choice = os.environ.get("STARKV_DECODE_KERNEL", "auto").lower()
    if choice == "torch":
        return False
    if choice == "triton":
        if triton is None:
            raise RuntimeError("STARKV_DECODE_KERNEL=triton but triton is not installed: pip install triton")
        return True
    if choice != "auto":
        raise ValueError(f"STARKV_DECODE_KERNEL={choice!r}: use auto, triton or torch")
    return triton is not None and device.type == "cuda"


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch, tokens, head_dim) at `positions`, as transformers' rotary embedding computes them."""
    freqs = positions.float()[..., None] * inv_freq.float().to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rope_scale).to(dtype), (emb.sin() * rope_scale).to(dtype)


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    cos/sin (batch, tokens, head_dim / 2) of the cached positions for the decode kernel, rounded to the model dtype
    as transformers rounds them and, for 16-bit dtypes, held as fp16: bf16 values of this range fit fp16 exactly
    (below 2^-14 to within 2^-25), and the kernel widens fp16 in one instruction a value instead of two (the scores
    pass 5-9% faster on the H100). The cache keeps them (each token's made once, as it is cached) and every layer
    reads them.
    """
    freqs = positions.float()[..., None] * inv_freq.float().to(positions.device)
    cos, sin = (freqs.cos() * rope_scale).to(dtype), (freqs.sin() * rope_scale).to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        cos, sin = cos.to(torch.float16), sin.to(torch.float16)
    return cos, sin


def latent_decode_reference(
    query: torch.Tensor,
    key_latents: torch.Tensor,
    value_latents: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    k_up_weight: torch.Tensor,
    k_ranks: list[int],
    k_bias: torch.Tensor | None,
    k_norm: torch.nn.Module | None,
    inv_freq: torch.Tensor,
    rope_scale: float,
    v_up_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """
    Decode attention in PyTorch (the model's own math): rebuild and rotate the keys, then attend in latent space.

    Args:
        query: (batch, num_heads, head_dim), already rotated at its position.
        key_latents: (batch, tokens, sum(k_ranks)); value_latents: (batch, tokens, v_rank).
        positions: (batch, tokens) int positions of the cached tokens.
        valid: (batch, tokens) bool, False for padding; None when every token counts.
        k_up_weight: (head_dim, sum(k_ranks)); k_bias: (num_kv_heads * head_dim) or None.
        k_norm: per-head RMSNorm applied to rebuilt keys (Qwen3) or None.
        inv_freq, rope_scale: the rotary embedding's inverse frequencies (head_dim / 2) and attention scaling.
        v_up_weight: (num_kv_heads * head_dim, v_rank); v_bias: (num_kv_heads * head_dim) or None.
        scaling: softmax scale.

    Returns:
        (batch, num_heads, head_dim)
    """
    cos, sin = rope_cos_sin(positions, inv_freq, rope_scale, query.dtype)
    keys = apply_rope(rebuild_keys(key_latents, k_up_weight, k_ranks, k_bias, k_norm), cos[:, None], sin[:, None])
    mask = None if valid is None else valid[:, None, None, :]
    out = latent_attention(query[:, :, None], keys, value_latents, v_up_weight, v_bias, mask, scaling)
    return out[:, 0]


if triton is not None:

    @triton.jit
    def _reduced_cos_sin(angle):
        """cos and sin of fp32 angles of any size: reduced to [-pi, pi] first (fast sin/cos are accurate there)."""
        turns = tl.floor(angle * 0.15915494309189535 + 0.5)
        angle = tl.fma(turns, -6.2831854820251465, angle) + turns * 1.7484556e-07  # 2 pi, in two parts
        return tl.cos(angle), tl.sin(angle)

    @triton.jit
    def _dequantized(ROWS, row, tok_ok, c, rank, codec, GROUP: tl.constexpr, DTYPE: tl.constexpr):
        """
        Columns `c` of a block's latents for a tile of tokens, from the codec's uint8 rows (`row`: each token's first
        byte; `codec`: the block's n8, code byte, scale byte, code bytes), per value: its code byte (int8, or a nibble
        of the int4 codes, low nibble first) and its fp16 scale. Same result as `LatentCodec.decode`.
        """
        n8, boff, soff = codec[0], codec[1], codec[2]
        groups8 = (n8 + GROUP - 1) // GROUP
        is8 = c < n8
        j = tl.where(is8, 0, c - n8)
        ok = tok_ok[:, None] & (c < rank)[None, :]
        raw = tl.load(ROWS + row[:, None] + boff + tl.where(is8, c, n8 + j // 2)[None, :], mask=ok, other=0)
        code8 = raw.to(tl.int8, bitcast=True).to(tl.float32)
        code4 = ((raw.to(tl.int32) >> (4 * (j % 2))[None, :]) & 15).to(tl.float32) - 8.0
        scale = _fp16_at(ROWS, row[:, None] + soff + 2 * tl.where(is8, c // GROUP, groups8 + j // GROUP)[None, :], ok)
        return (tl.where(is8[None, :], code8, code4) * scale).to(DTYPE)

    @triton.jit
    def _slot(s, rank, n8, HG: tl.constexpr):
        """Scale group `s` of a block (8-bit groups first, then 4-bit): whether it is 8-bit, first channel, end."""
        groups8 = (n8 + 2 * HG - 1) // (2 * HG)
        is8 = s < groups8
        return is8, tl.where(is8, s * 2 * HG, n8 + (s - groups8) * 2 * HG), tl.where(is8, n8, rank)

    @triton.jit
    def _slot_weights(W, stride_wd, offset, rank, n8, s, dims, HALF: tl.constexpr, HG: tl.constexpr):
        """The up-projection rows of scale group `s` of a head, even and odd channels, each split in RoPE halves."""
        _, base, end = _slot(s, rank, n8, HG)
        c = base + 2 * tl.arange(0, HG)
        ptr = W + (offset + c)[:, None] + dims[None, :] * stride_wd
        even, odd = (c < end)[:, None], (c + 1 < end)[:, None]
        return (
            tl.load(ptr, mask=even, other=0.0),
            tl.load(ptr + HALF * stride_wd, mask=even, other=0.0),
            tl.load(ptr + 1, mask=odd, other=0.0),
            tl.load(ptr + 1 + HALF * stride_wd, mask=odd, other=0.0),
        )

    @triton.jit
    def _group_codes(
        ROWS, at, tok_ok, groups, rank, n8, size,
        HG: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr,
    ):  # fmt: skip
        """
        The integer codes of scale groups `groups` of a block for a tile of tokens, even and odd channels, read as
        whole bytes: an 8-bit group's 2 HG bytes, or a 4-bit group's HG bytes (channel pairs in the low and high
        nibbles). Keys pass one group (a scalar; `at`, each token's first code byte of the block, and `tok_ok` as
        (BT, 1)) and get (BT, HG) codes; the values pass NG groups as (NG, 1), `at` and `tok_ok` as (BT, 1, 1), and
        gets (BT, NG, HG). `at`, `size` (the block's code bytes, padded) and, if the block has 4-bit codes, n8 are
        multiples of ALIGN. Bytes past `size` read as 0; channels past a group's end come out as arbitrary codes
        (whatever multiplies them must be zero there). HAS8 / HAS4: whether 8-bit / 4-bit groups occur at all.
        """
        groups8 = (n8 + 2 * HG - 1) // (2 * HG)
        is8 = groups < groups8
        if HAS8:
            b8 = groups * 2 * HG + tl.arange(0, 2 * HG)  # the group's bytes
            raw8 = tl.load(ROWS + at + b8, mask=tok_ok & (b8 < tl.where(is8, size, 0)), other=0)
            if len(raw8.shape) == 2:
                pairs = tl.reshape(raw8, [raw8.shape[0], HG, 2])
            else:
                pairs = tl.reshape(raw8, [raw8.shape[0], raw8.shape[1], HG, 2])
            even8, odd8 = tl.split(pairs)
            even, odd = even8.to(tl.int8, bitcast=True).to(tl.int32), odd8.to(tl.int8, bitcast=True).to(tl.int32)
        if HAS4:
            # (a block of 8 bits only reads none, from an aligned address all the same: masked copies still need one)
            start4 = tl.multiple_of(tl.where(n8 == rank, 0, n8), ALIGN)
            b4 = start4 + tl.maximum(groups - groups8, 0) * HG + tl.arange(0, HG)  # 8-bit groups: masked, in bounds
            end4 = tl.where(is8, 0, tl.where(n8 == rank, 0, size))
            raw4 = tl.load(ROWS + at + b4, mask=tok_ok & (b4 < end4), other=0).to(tl.int32)
            if HAS8:
                even, odd = tl.where(is8, even, (raw4 & 15) - 8), tl.where(is8, odd, (raw4 >> 4) - 8)
            else:
                even, odd = (raw4 & 15) - 8, (raw4 >> 4) - 8
        return even, odd

    @triton.jit
    def _slot_latents(
        ROWS, row, tok_ok, s, rank, codec,
        HG: tl.constexpr, DTYPE: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr,
        WORDS: tl.constexpr,
    ):  # fmt: skip
        """
        Scale group `s` of a block's latents for a tile of tokens (`row`: each token's first byte), even and odd
        channels (BT, HG) each, dequantized from whole code bytes and one scale per token. Channels past the group's
        end come out as arbitrary finite values (whatever multiplies them must be zero there).
        """
        even, odd, scale = _slot_codes(ROWS, row, tok_ok, s, rank, codec, HG, HAS8, HAS4, ALIGN, WORDS)
        return (even * scale).to(DTYPE), (odd * scale).to(DTYPE)

    @triton.jit
    def _slot_codes(
        ROWS, row, tok_ok, s, rank, codec,
        HG: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        """
        `_slot_latents` before the scale: even and odd codes (BT, HG) as fp32, and each token's scale (BT, 1) (WORDS,
        ALIGN >= 4: read from its 4-byte word, see `_fp16_at`).
        """
        n8, boff, soff, size = codec
        at = tl.multiple_of(row + boff, ALIGN)[:, None]
        even, odd = _group_codes(ROWS, at, tok_ok[:, None], s, rank, n8, size, HG, HAS8, HAS4, ALIGN)
        _, base, end = _slot(s, rank, n8, HG)
        scale = _fp16_at(ROWS, row + soff + 2 * s, tok_ok & (row * 0 + base < end), WORDS and ALIGN >= 4)[:, None]
        return even.to(tl.float32), odd.to(tl.float32), scale

    @triton.jit
    def _group_scales(
        ROWS, row, tok_ok, first, rank, n8, soff, NG: tl.constexpr, HG: tl.constexpr, WORDS: tl.constexpr
    ):  # fmt: skip
        """
        The fp16 scales of NG groups first .. first + NG - 1 of a tile of tokens, (BT, NG) fp32 (0: no group); WORDS
        (rows 4-byte aligned): read from their 4-byte words (`_fp16_at`).
        """
        groups = first + tl.arange(0, NG)
        _, base, end = _slot(groups, rank, n8, HG)  # (NG,) each
        at, ok = row[:, None] + soff + 2 * groups[None, :], tok_ok[:, None] & (base < end)[None, :]
        return _fp16_at(ROWS, at, ok, WORDS)

    @triton.jit
    def _group_latents(
        ROWS, row, tok_ok, first, rank, n8, scale, size,
        NG: tl.constexpr, HG: tl.constexpr, DTYPE: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr,
        ALIGN: tl.constexpr,
    ):  # fmt: skip
        """
        `_slot_latents` of NG groups at once, first .. first + NG - 1, of a block whose codes start each row: even and
        odd channels (BT, NG, HG) each, given their `_group_scales`. (One group in two dimensions compiles to faster
        code for the keys; this is for the values pass.)
        """
        groups = first + tl.arange(0, NG)
        at = tl.multiple_of(row, ALIGN)[:, None, None]
        scale = scale[:, :, None]
        even, odd = _group_codes(
            ROWS, at, tok_ok[:, None, None], groups[:, None], rank, n8, size, HG, HAS8, HAS4, ALIGN
        )
        return (even.to(tl.float32) * scale).to(DTYPE), (odd.to(tl.float32) * scale).to(DTYPE)

    @triton.jit
    def _fp16_at(ROWS, at, ok, WORDS: tl.constexpr = False):
        """
        fp16 values at even byte offsets `at` of the rows, as fp32. WORDS (rows 4-byte aligned): each read as half of
        the 4-byte word it lies in, a load triton copies asynchronously (2-byte loads it waits for where they stand).
        """
        if WORDS:
            word = tl.load((ROWS + (at & -4)).to(tl.pointer_type(tl.int32)), mask=ok, other=0)
            bits = tl.where((at & 2) != 0, word >> 16, word) & 0xFFFF
            return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return tl.load((ROWS + at).to(tl.pointer_type(tl.float16)), mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _described_tile(desc, at, column):
        """A (tokens, columns) tile by TMA from a 3-D (sequence, token, column) descriptor; 0 outside the tensor."""
        block = desc.load([at[0], at[1], column])
        return tl.reshape(block, [block.shape[1], block.shape[2]])

    @triton.jit
    def _latent_chunk(ZK, zrow, tok_ok, start, limit, C0: tl.constexpr, R: tl.constexpr, TMA: tl.constexpr):
        """
        Columns start + C0 .. + R of a tile's 16-bit key latents, (BT, R), 0 past `limit` columns or the context: by
        TMA (`ZK`: the descriptors of the R1 and R2 chunks, `zrow`: sequence and first token) or by pointers.
        """
        if TMA:
            if C0 == 0:
                z = _described_tile(ZK[0], zrow, start)
            else:
                z = _described_tile(ZK[1], zrow, start + C0)
        else:
            c = C0 + tl.arange(0, R)
            ok = tok_ok[:, None] & (c[None, :] < limit)
            z = tl.load(ZK + zrow[:, None] + (start + c)[None, :], mask=ok, other=0.0)
        return z

    @triton.jit
    def _head_weights(
        W, stride_wd, offset, rank, row_len, dims,
        HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, ALIGNED: tl.constexpr,
    ):  # fmt: skip
        """
        A KV head's up-projection, transposed, as two power-of-two row chunks R1 + R2 that cover its rank (38 -> 32 +
        16, not 64), each split into the halves RoPE pairs up: (R, HALF). Also the first latent column to read and how
        many columns may be read from it. ALIGNED: the latents are read from the 8-aligned column at or before the
        head's offset (16-byte loads), and the rows of the up-projection outside the head are zero instead.
        """
        if ALIGNED:
            start = tl.multiple_of((offset // 8) * 8, 8)
            lo = offset - start
            limit = row_len - start
        else:
            start = offset
            lo = 0
            limit = rank
        c = tl.arange(0, R1)
        w_ptr = W + (start + c)[:, None] + dims[None, :] * stride_wd
        w_mask = (c[:, None] >= lo) & (c[:, None] < lo + rank)
        w1_lo = tl.load(w_ptr, mask=w_mask, other=0.0)
        w1_hi = tl.load(w_ptr + HALF * stride_wd, mask=w_mask, other=0.0)
        if R2 > 0:
            c2 = R1 + tl.arange(0, R2)
            w_ptr2 = W + (start + c2)[:, None] + dims[None, :] * stride_wd
            w_mask2 = (c2[:, None] >= lo) & (c2[:, None] < lo + rank)
            w2_lo = tl.load(w_ptr2, mask=w_mask2, other=0.0)
            w2_hi = tl.load(w_ptr2 + HALF * stride_wd, mask=w_mask2, other=0.0)
        else:
            w2_lo = w1_lo
            w2_hi = w1_hi
        return start, limit, w1_lo, w1_hi, w2_lo, w2_hi

    @triton.jit
    def _slot_dot(
        ROWS, row, tok_ok, s, rank, codec, we_lo, we_hi, wo_lo, wo_hi, k_lo, k_hi,
        PRECISION: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        """Adds scale group `s`'s share of a head's keys: its dequantized latents times its up-projection rows."""
        even, odd = _slot_latents(
            ROWS, row, tok_ok, s, rank, codec, we_lo.shape[0], we_lo.dtype, HAS8, HAS4, ALIGN, WORDS
        )
        k_lo = tl.dot(even, we_lo, k_lo, input_precision=PRECISION)
        k_hi = tl.dot(even, we_hi, k_hi, input_precision=PRECISION)
        k_lo = tl.dot(odd, wo_lo, k_lo, input_precision=PRECISION)
        return k_lo, tl.dot(odd, wo_hi, k_hi, input_precision=PRECISION)

    @triton.jit
    def _head_keys(
        ZK, zrow, tok_ok, start, limit, wts, codec,
        R1: tl.constexpr, R2: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
        SLOTS: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr, JOINED: tl.constexpr,
        TMA: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        """
        One KV head's keys of a tile, (BT, HALF) twice, fp32: its latents times its up-projection (tensor cores).
        TMA: `ZK` holds the descriptors of the R1 and R2 column chunks and `zrow` the sequence and first token.
        JOINED: `wts` holds the halves side by side, (R, 2 HALF), one product a chunk (16-bit latents only).
        QUANT: the latents are dequantized from the head's codes and scales in each token's row (`codec`: the head's
        n8, code byte, scale byte and code bytes): per scale group when SLOTS > 0 (`wts` then holds each group's even
        and odd up-projection rows), else per value.
        """
        if SLOTS > 0:
            k_lo = tl.zeros([zrow.shape[0], wts[0].shape[1]], tl.float32)
            k_lo, k_hi = _slot_dot(ZK, zrow, tok_ok, 0, limit, codec, wts[0], wts[1], wts[2], wts[3], k_lo, k_lo,
                                   PRECISION, HAS8, HAS4, ALIGN, WORDS)  # fmt: skip
            if SLOTS > 1:
                k_lo, k_hi = _slot_dot(ZK, zrow, tok_ok, 1, limit, codec, wts[4], wts[5], wts[6], wts[7], k_lo, k_hi,
                                       PRECISION, HAS8, HAS4, ALIGN, WORDS)  # fmt: skip
            if SLOTS > 2:
                k_lo, k_hi = _slot_dot(ZK, zrow, tok_ok, 2, limit, codec, wts[8], wts[9], wts[10], wts[11], k_lo,
                                       k_hi, PRECISION, HAS8, HAS4, ALIGN, WORDS)  # fmt: skip
        else:
            c = tl.arange(0, R1)
            if QUANT:
                z = _dequantized(ZK, zrow, tok_ok, c, limit, codec, GROUP, wts[0].dtype)
            else:
                z = _latent_chunk(ZK, zrow, tok_ok, start, limit, 0, R1, TMA)
            if JOINED:
                k = tl.dot(z, wts[0], input_precision=PRECISION)
            else:
                k_lo = tl.dot(z, wts[0], input_precision=PRECISION)
                k_hi = tl.dot(z, wts[1], input_precision=PRECISION)
            if R2 > 0:
                c2 = R1 + tl.arange(0, R2)
                if QUANT:
                    z2 = _dequantized(ZK, zrow, tok_ok, c2, limit, codec, GROUP, wts[0].dtype)
                else:
                    z2 = _latent_chunk(ZK, zrow, tok_ok, start, limit, R1, R2, TMA)
                if JOINED:
                    k = tl.dot(z2, wts[2], k, input_precision=PRECISION)
                else:
                    k_lo = tl.dot(z2, wts[2], k_lo, input_precision=PRECISION)
                    k_hi = tl.dot(z2, wts[3], k_hi, input_precision=PRECISION)
            if JOINED:  # (the halves are whole 8-column groups of the product's layout: no data moves)
                k_lo, k_hi = tl.split(tl.permute(tl.reshape(k, [k.shape[0], 2, k.shape[1] // 2]), (0, 2, 1)))
        return k_lo, k_hi

    @triton.jit
    def _rotated_keys(
        ZK, zrow, tok_ok, start, limit, wts, codec, bias_lo, bias_hi, norm_lo, norm_hi, eps, cos, sin,
        HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_NORM: tl.constexpr, DTYPE: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr,
        HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr, JOINED: tl.constexpr, TMA: tl.constexpr,
        WORDS: tl.constexpr,
    ):  # fmt: skip
        """A head's keys of a tile rebuilt (+ bias, + k-norm) and rotated, in the query dtype: (BT, HALF) twice."""
        k_lo, k_hi = _head_keys(
            ZK, zrow, tok_ok, start, limit, wts, codec, R1, R2, PRECISION, QUANT, GROUP, SLOTS, HAS8, HAS4, ALIGN,
            JOINED, TMA, WORDS,
        )  # fmt: skip
        if HAS_BIAS:
            k_lo += bias_lo[None, :]
            k_hi += bias_hi[None, :]
        if HAS_NORM:
            inv_rms = tl.rsqrt((tl.sum(k_lo * k_lo, 1) + tl.sum(k_hi * k_hi, 1)) / (2 * HALF) + eps)
            k_lo = k_lo * inv_rms[:, None] * norm_lo[None, :]
            k_hi = k_hi * inv_rms[:, None] * norm_hi[None, :]
        return (k_lo * cos - k_hi * sin).to(DTYPE), (k_hi * cos + k_lo * sin).to(DTYPE)

    @triton.jit
    def _head_codec(CODEC, head, ALIGN: tl.constexpr):
        """Where a quantized head lies in each token's row: its 8-bit channels, first code byte, first scale byte and
        code bytes (padded)."""
        n8 = tl.load(CODEC + 4 * head)
        boff = tl.multiple_of(tl.load(CODEC + 4 * head + 1).to(tl.int64), ALIGN)
        soff = tl.load(CODEC + 4 * head + 2).to(tl.int64)
        return n8, boff, soff, tl.multiple_of(tl.load(CODEC + 4 * head + 3), ALIGN)

    @triton.jit
    def _head_setup(
        Q, W, RANKS, OFFSETS, CODEC, KBIAS, head, b, stride_qb, stride_qh, stride_wd, row_len, dims, g,
        G: tl.constexpr, HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, ALIGNED: tl.constexpr,
        HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr, ALIGN: tl.constexpr,
        JOINED: tl.constexpr,
    ):  # fmt: skip
        """
        What the scores pass keeps of a KV head across its tiles: its up-projection (`wts`: the R1 and R2 row chunks,
        or each scale group's even and odd rows), its G queries (transposed), bias, and where its codes lie. JOINED:
        each chunk's RoPE halves side by side, (R, 2 HALF), and the queries whole, (2 HALF, GP), in both query slots.
        """
        offset, rank = tl.load(OFFSETS + head), tl.load(RANKS + head)
        if QUANT:
            n8, boff, soff, size = _head_codec(CODEC, head, ALIGN)
        else:
            n8 = 0
            boff = 0
            soff = 0
            size = 0
        if SLOTS > 0:
            start, limit = offset, rank
            a0, a1, a2, a3 = _slot_weights(W, stride_wd, offset, rank, n8, 0, dims, HALF, GROUP // 2)
            wts = (a0, a1, a2, a3)
            if SLOTS > 1:
                b0, b1, b2, b3 = _slot_weights(W, stride_wd, offset, rank, n8, 1, dims, HALF, GROUP // 2)
                wts = (a0, a1, a2, a3, b0, b1, b2, b3)
            if SLOTS > 2:
                c0, c1, c2, c3 = _slot_weights(W, stride_wd, offset, rank, n8, 2, dims, HALF, GROUP // 2)
                wts = (a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3)
        else:
            start, limit, w1_lo, w1_hi, w2_lo, w2_hi = _head_weights(
                W, stride_wd, offset, rank, row_len, dims, HALF, R1, R2, ALIGNED
            )
            if JOINED:
                w1 = tl.reshape(tl.permute(tl.join(w1_lo, w1_hi), (0, 2, 1)), [R1, 2 * HALF])
                if R2 > 0:
                    w2 = tl.reshape(tl.permute(tl.join(w2_lo, w2_hi), (0, 2, 1)), [R2, 2 * HALF])
                else:
                    w2 = w1
                wts = (w1, w1, w2, w2)
            else:
                wts = (w1_lo, w1_hi, w2_lo, w2_hi)
        q_ptr = Q + b * stride_qb + (head * G + g)[None, :] * stride_qh + dims[:, None]
        q_lo = tl.load(q_ptr, mask=g[None, :] < G, other=0.0)  # (HALF, GP)
        q_hi = tl.load(q_ptr + HALF, mask=g[None, :] < G, other=0.0)
        if JOINED:
            q_lo = tl.reshape(tl.permute(tl.join(q_lo, q_hi), (2, 0, 1)), [2 * HALF, g.shape[0]])
            q_hi = q_lo
        if HAS_BIAS:
            bias_lo = tl.load(KBIAS + head * 2 * HALF + dims).to(tl.float32)
            bias_hi = tl.load(KBIAS + head * 2 * HALF + HALF + dims).to(tl.float32)
        else:
            bias_lo = tl.zeros([HALF], tl.float32)
            bias_hi = bias_lo
        return start, limit, wts, q_lo, q_hi, bias_lo, bias_hi, (n8, boff, soff, size)

    @triton.jit
    def _folded_chunk(q_lo, q_hi, w_lo, w_hi):
        """
        The cos and sin weights of a block of latent channels (rows of the up-projection split in RoPE halves, (R,
        HALF)), fp32: with k = W z rotated at angles a, q . rot(k) = sum over frequencies f of
        cos a_f (q_lo k_lo + q_hi k_hi)_f + sin a_f (q_hi k_lo - q_lo k_hi)_f, both brackets linear in the latents z.
        """
        w_lo, w_hi = w_lo.to(tl.float32), w_hi.to(tl.float32)
        return q_lo[None, :] * w_lo + q_hi[None, :] * w_hi, q_hi[None, :] * w_lo - q_lo[None, :] * w_hi

    @triton.jit
    def _abs_max(x):
        return tl.max(tl.max(tl.abs(x), 1), 0)

    @triton.jit
    def _folded_pair(q_lo, q_hi, w_lo, w_hi, w2_lo, w2_hi):
        """`_folded_chunk` of two blocks, and the largest magnitude of the four results."""
        c1, s1 = _folded_chunk(q_lo, q_hi, w_lo, w_hi)
        c2, s2 = _folded_chunk(q_lo, q_hi, w2_lo, w2_hi)
        peak = tl.maximum(tl.maximum(_abs_max(c1), _abs_max(s1)), tl.maximum(_abs_max(c2), _abs_max(s2)))
        return (c1, s1, c2, s2), peak

    @triton.jit
    def _half_transposed(fold, scale):
        """Folded weights (R, HALF) fp32 as tensor-core operands: scaled, transposed to (HALF, R), fp16."""
        return (
            tl.trans(fold[0] * scale).to(tl.float16),
            tl.trans(fold[1] * scale).to(tl.float16),
            tl.trans(fold[2] * scale).to(tl.float16),
            tl.trans(fold[3] * scale).to(tl.float16),
        )

    @triton.jit
    def _joined_transposed(fold, scale, HALF: tl.constexpr, GROUP: tl.constexpr):
        """A scale group's folded cos and sin weights, (HALF, GROUP) fp16 each, channels in order (even and odd
        joined)."""
        c = tl.join(tl.trans(fold[0] * scale), tl.trans(fold[2] * scale))
        s = tl.join(tl.trans(fold[1] * scale), tl.trans(fold[3] * scale))
        return tl.reshape(c, [HALF, GROUP]).to(tl.float16), tl.reshape(s, [HALF, GROUP]).to(tl.float16)

    @triton.jit
    def _folded_setup(
        Q, W, RANKS, OFFSETS, CODEC, head, b, stride_qb, stride_qh, stride_wd, row_len, dims, scaling,
        HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, ALIGNED: tl.constexpr, SLOTS: tl.constexpr,
        GROUP: tl.constexpr, ALIGN: tl.constexpr, JOINED: tl.constexpr,
    ):  # fmt: skip
        """
        What the folded scores pass (G = 1) keeps of a KV head: its query folded into its up-projection as cos and
        sin weights (HALF, R) fp16 per block of channels (the R1 and R2 chunks, or with SLOTS > 0 each scale group's
        even and odd channels, or with JOINED too the group's channels in order: one cos and one sin block a group),
        scaled so that the largest is 2^14 (fp16 neither overflows nor loses small weights), the factor that undoes
        the scale, and where the head's latents or codes lie.
        """
        offset, rank = tl.load(OFFSETS + head), tl.load(RANKS + head)
        q = Q + b * stride_qb + head * stride_qh + dims
        q_lo, q_hi = tl.load(q).to(tl.float32) * scaling, tl.load(q + HALF).to(tl.float32) * scaling
        if SLOTS > 0:
            codec = _head_codec(CODEC, head, ALIGN)
            n8 = codec[0]
            start, limit = offset, rank
            e_lo, e_hi, o_lo, o_hi = _slot_weights(W, stride_wd, offset, rank, n8, 0, dims, HALF, GROUP // 2)
            f0, peak = _folded_pair(q_lo, q_hi, e_lo, e_hi, o_lo, o_hi)
            f1, f2 = f0, f0
            if SLOTS > 1:
                e_lo, e_hi, o_lo, o_hi = _slot_weights(W, stride_wd, offset, rank, n8, 1, dims, HALF, GROUP // 2)
                f1, peak1 = _folded_pair(q_lo, q_hi, e_lo, e_hi, o_lo, o_hi)
                peak = tl.maximum(peak, peak1)
            if SLOTS > 2:
                e_lo, e_hi, o_lo, o_hi = _slot_weights(W, stride_wd, offset, rank, n8, 2, dims, HALF, GROUP // 2)
                f2, peak2 = _folded_pair(q_lo, q_hi, e_lo, e_hi, o_lo, o_hi)
                peak = tl.maximum(peak, peak2)
        else:
            codec = (0, 0, 0, 0)
            start, limit, w1_lo, w1_hi, w2_lo, w2_hi = _head_weights(
                W, stride_wd, offset, rank, row_len, dims, HALF, R1, R2, ALIGNED
            )
            if R2 == 0:
                w2_lo, w2_hi = w1_lo, w1_hi
            f0, peak = _folded_pair(q_lo, q_hi, w1_lo, w1_hi, w2_lo, w2_hi)
            f1, f2 = f0, f0
        scale = 16384.0 / tl.where(peak > 0, peak, 16384.0)
        if SLOTS > 0 and JOINED:
            folds = (
                _joined_transposed(f0, scale, HALF, GROUP),
                _joined_transposed(f1, scale, HALF, GROUP),
                _joined_transposed(f2, scale, HALF, GROUP),
            )
        else:
            folds = (_half_transposed(f0, scale), _half_transposed(f1, scale), _half_transposed(f2, scale))
        return start, limit, codec, folds, 1.0 / scale

    @triton.jit
    def _channel_weights(cos, sin, fold, which: tl.constexpr):
        """Each token's weight of each channel of a block, (BT, R) fp32: its cos/sin tables times folded weights."""
        return tl.dot(sin, fold[2 * which + 1], tl.dot(cos, fold[2 * which]))

    @triton.jit
    def _in_order(even, odd):
        """A scale group's even and odd channels (BT, HG) each joined in channel order, (BT, 2 HG)."""
        return tl.reshape(tl.join(even, odd), [even.shape[0], 2 * even.shape[1]])

    @triton.jit
    def _slot_scores(codes, cos, sin, fold):
        """A scale group's share of the scores of a tile: its codes times their channel weights, times the scale."""
        even, odd, scale = codes
        if len(fold) == 2:  # even and odd channels joined: one cos and one sin product
            weighted = tl.sum(_in_order(even, odd) * tl.dot(sin, fold[1], tl.dot(cos, fold[0])), 1)
        else:
            weighted = tl.sum(even * _channel_weights(cos, sin, fold, 0), 1)
            weighted += tl.sum(odd * _channel_weights(cos, sin, fold, 1), 1)
        return weighted * tl.reshape(scale, [scale.shape[0]])

    @triton.jit
    def _folded_latents(
        ZK, tile, T, b, stride_zb, stride_zt, setup,
        BT: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, TMA: tl.constexpr, SLOTS: tl.constexpr,
        HG: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr,
    ):  # fmt: skip
        """
        What the folded pass reads of a tile's key latents: the R1 and R2 chunks, or each scale group's even and odd
        codes and scale (0 past the context). The tile loop loads the next tile's while it scores this one: the
        software pipeliner stages only loads that feed products, and these feed elementwise math.
        """
        start, limit, codec, _, _ = setup
        t = tile * BT + tl.arange(0, BT)
        in_range = t < T
        if TMA:
            zrow = (tl.program_id(2), tile * BT)
        else:
            zrow = b * stride_zb + t * stride_zt
        if SLOTS > 0:
            zrow = tl.multiple_of(zrow, ALIGN)
            c0 = _slot_codes(ZK, zrow, in_range, 0, limit, codec, HG, HAS8, HAS4, ALIGN, False)
            c1, c2 = c0, c0
            if SLOTS > 1:
                c1 = _slot_codes(ZK, zrow, in_range, 1, limit, codec, HG, HAS8, HAS4, ALIGN, False)
            if SLOTS > 2:
                c2 = _slot_codes(ZK, zrow, in_range, 2, limit, codec, HG, HAS8, HAS4, ALIGN, False)
            latents = (c0, c1, c2)
        else:
            z1 = _latent_chunk(ZK, zrow, in_range, start, limit, 0, R1, TMA)
            z2 = z1
            if R2 > 0:
                z2 = _latent_chunk(ZK, zrow, in_range, start, limit, R1, R2, TMA)
            latents = (z1, z2)
        return latents

    @triton.jit
    def _folded_tile_scores(
        latents, keep, stored, S, srow, t, head, setup, cos, sin, stride_sh, stride_st,
        R2: tl.constexpr, SLOTS: tl.constexpr,
    ):  # fmt: skip
        """
        Scores of a KV head's one query head over a tile without rebuilding keys: the tile's fp16 cos/sin tables
        times the folded weights give each token's weight of each latent channel (tensor cores, (BT, R) fp32), and
        the score is the sum of the latents (`_folded_latents`) times those weights (quantized: per scale group, the
        codes times them, times the group's scale).
        """
        _, _, _, folds, unscale = setup
        if SLOTS > 0:
            scores = _slot_scores(latents[0], cos, sin, folds[0])
            if SLOTS > 1:
                scores += _slot_scores(latents[1], cos, sin, folds[1])
            if SLOTS > 2:
                scores += _slot_scores(latents[2], cos, sin, folds[2])
        else:
            scores = tl.sum(latents[0].to(tl.float32) * _channel_weights(cos, sin, folds[0], 0), 1)
            if R2 > 0:
                scores += tl.sum(latents[1].to(tl.float32) * _channel_weights(cos, sin, folds[0], 1), 1)
        _store_scores(S, S + srow + head * stride_sh + t * stride_st, scores * unscale, keep, stored)

    @triton.jit
    def _folded_step(
        tile_args, latents, head, setup,
        BT: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, TMA: tl.constexpr, SLOTS: tl.constexpr,
        GROUP: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr,
    ):  # fmt: skip
        """
        One head's folded scores of a tile from its `latents`; returns the next tile's, loaded meanwhile. `tile_args`:
        what every head of the program shares for the tile (latents, tile, scores buffer, masks, tables, strides).
        """
        zk, tile, T, b, stride_zb, stride_zt, keep, stored, S, srow, t, cos, sin, stride_sh, stride_st = tile_args
        following = _folded_latents(
            zk, tile + 1, T, b, stride_zb, stride_zt, setup, BT, R1, R2, TMA, SLOTS, GROUP // 2, HAS8, HAS4, ALIGN
        )
        _folded_tile_scores(latents, keep, stored, S, srow, t, head, setup, cos, sin, stride_sh, stride_st, R2, SLOTS)
        return following

    @triton.jit
    def _side_by_side(a, b):
        """Two (M, N) blocks as one (M, 2 N), columns interleaved."""
        return tl.reshape(tl.join(a, b), [a.shape[0], 2 * a.shape[1]])

    @triton.jit
    def _pair_fold(cos0, sin0, cos1, sin1):
        """Two heads' cos and sin weights of a block of channels side by side, (HALF, 2 N) each."""
        return _side_by_side(cos0, cos1), _side_by_side(sin0, sin1)

    @triton.jit
    def _paired_folds(setup0, setup1, SLOTS: tl.constexpr):
        """
        `_pair_fold` of each block of two KV heads (made once per program: the products' B operands): each scale
        group's (SLOTS > 0), or the R1 and R2 chunks' (16-bit latents).
        """
        folds0, folds1 = setup0[3], setup1[3]
        p0 = _pair_fold(folds0[0][0], folds0[0][1], folds1[0][0], folds1[0][1])
        p1, p2 = p0, p0
        if SLOTS == 0:  # (16-bit latents: one fold holds the R1 chunk's cos and sin weights, then the R2 chunk's)
            p1 = _pair_fold(folds0[0][2], folds0[0][3], folds1[0][2], folds1[0][3])
        if SLOTS > 1:
            p1 = _pair_fold(folds0[1][0], folds0[1][1], folds1[1][0], folds1[1][1])
        if SLOTS > 2:
            p2 = _pair_fold(folds0[2][0], folds0[2][1], folds1[2][0], folds1[2][1])
        return p0, p1, p2

    @triton.jit
    def _paired_scores(z0, z1, cos, sin, pair):
        """Two heads' scores of a tile over a block of channels, (BT,) each, from one cos and one sin product for
        both: their latents (BT, N) side by side times the tables times the `_pair_fold`."""
        bt: tl.constexpr = z0.shape[0]
        n: tl.constexpr = z0.shape[1]
        both = _side_by_side(z0.to(tl.float32), z1.to(tl.float32))
        weighted = both * tl.dot(sin, pair[1], tl.dot(cos, pair[0]))
        return tl.split(tl.sum(tl.reshape(weighted, [bt, n, 2]), 1))

    @triton.jit
    def _paired_slot_scores(codes0, codes1, cos, sin, pair):
        """A scale group's share of two heads' scores of a tile (`_paired_scores`), times each head's scales."""
        even0, odd0, scale0 = codes0
        even1, odd1, scale1 = codes1
        bt: tl.constexpr = even0.shape[0]
        first, second = _paired_scores(_in_order(even0, odd0), _in_order(even1, odd1), cos, sin, pair)
        return first * tl.reshape(scale0, [bt]), second * tl.reshape(scale1, [bt])

    @triton.jit
    def _paired_step(
        tile_args, latents0, latents1, head, setup0, setup1, pairs,
        BT: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, TMA: tl.constexpr, SLOTS: tl.constexpr,
        GROUP: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr,
    ):  # fmt: skip
        """
        `_folded_step` of two KV heads at once: per scale group (quantized keys, even and odd channels joined) or
        rank chunk (16-bit latents), the tile's tables times both heads' folded weights side by side
        (`_paired_folds`), one cos and one sin product.
        """
        zk, tile, T, b, stride_zb, stride_zt, keep, stored, S, srow, t, cos, sin, stride_sh, stride_st = tile_args
        hg: tl.constexpr = GROUP // 2
        following0 = _folded_latents(
            zk, tile + 1, T, b, stride_zb, stride_zt, setup0, BT, R1, R2, TMA, SLOTS, hg, HAS8, HAS4, ALIGN
        )
        following1 = _folded_latents(
            zk, tile + 1, T, b, stride_zb, stride_zt, setup1, BT, R1, R2, TMA, SLOTS, hg, HAS8, HAS4, ALIGN
        )
        if SLOTS > 0:
            scores0, scores1 = _paired_slot_scores(latents0[0], latents1[0], cos, sin, pairs[0])
            if SLOTS > 1:
                more0, more1 = _paired_slot_scores(latents0[1], latents1[1], cos, sin, pairs[1])
                scores0, scores1 = scores0 + more0, scores1 + more1
            if SLOTS > 2:
                more0, more1 = _paired_slot_scores(latents0[2], latents1[2], cos, sin, pairs[2])
                scores0, scores1 = scores0 + more0, scores1 + more1
        else:
            scores0, scores1 = _paired_scores(latents0[0], latents1[0], cos, sin, pairs[0])
            if R2 > 0:
                more0, more1 = _paired_scores(latents0[1], latents1[1], cos, sin, pairs[1])
                scores0, scores1 = scores0 + more0, scores1 + more1
        ptrs = S + srow + head * stride_sh + t * stride_st
        _store_scores(S, ptrs, scores0 * setup0[4], keep, stored)
        _store_scores(S, ptrs + stride_sh, scores1 * setup1[4], keep, stored)
        return following0, following1

    @triton.jit
    def _store_scores(S, ptrs, scores, keep, mask):
        """Scores to the buffer, -inf where not `keep`."""
        if S.dtype.element_ty == tl.float16:  # an fp16 buffer: finite scores stay finite, NaN stays NaN (selects, as
            # minimum/maximum drop NaN and tl.clamp fails under torch.compile); past +-65000 they saturate (exact while
            # a single token is past the range: the softmax is one-hot on it either way)
            scores = tl.where(scores > 65000.0, 65000.0, tl.where(scores < -65000.0, -65000.0, scores))
        scores = tl.where(keep, scores, float("-inf"))
        tl.store(ptrs, scores.to(S.dtype.element_ty), mask=mask)

    @triton.jit
    def _head_tile_scores(
        tile_args, head, g, setup,
        G: tl.constexpr, HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, PRECISION: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr,
        HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr, JOINED: tl.constexpr, TMA: tl.constexpr,
        WORDS: tl.constexpr,
    ):  # fmt: skip
        """
        Scores of a KV head's G query heads over one tile, stored to the scores buffer (-inf where not `keep`) for the
        tile's `stored` tokens: all of them, as the buffer is padded to whole tiles (masks constant over 16 tokens let
        the stores vectorize). `tile_args`: what every head of the program shares for the tile (latents, masks,
        scores buffer, k-norm weights, tables, scale, strides).
        """
        ZK, zrow, in_range, keep, stored, S, srow, t, norm_lo, norm_hi, eps, cos, sin, scaling, stride_sh, stride_st = (
            tile_args
        )
        start, limit, wts, q_lo, q_hi, bias_lo, bias_hi, codec = setup
        rot_lo, rot_hi = _rotated_keys(
            ZK, zrow, in_range, start, limit, wts, codec, bias_lo, bias_hi, norm_lo, norm_hi, eps, cos, sin,
            HALF, R1, R2, PRECISION, HAS_BIAS, HAS_NORM, q_lo.dtype, QUANT, GROUP, SLOTS, HAS8, HAS4, ALIGN, JOINED,
            TMA, WORDS,
        )  # fmt: skip
        if JOINED:  # one product over the whole head dimension
            rot = tl.reshape(tl.permute(tl.join(rot_lo, rot_hi), (0, 2, 1)), [rot_lo.shape[0], 2 * HALF])
            scores = tl.dot(rot, q_lo, input_precision=PRECISION) * scaling  # (BT, GP)
        else:
            scores = tl.dot(rot_lo, q_lo, input_precision=PRECISION)  # (BT, GP)
            scores = tl.dot(rot_hi, q_hi, scores, input_precision=PRECISION) * scaling
        ptrs = S + srow + (head * G + g)[None, :] * stride_sh + t[:, None] * stride_st
        _store_scores(S, ptrs, scores, keep[:, None], stored[:, None] & (g[None, :] < G))

    @triton.jit
    def _program_head(
        Q, W, RANKS, OFFSETS, CODEC, KBIAS, head, b, stride_qb, stride_qh, stride_wd, row_len, dims, g, scaling,
        G: tl.constexpr, HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, ALIGNED: tl.constexpr,
        HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr, ALIGN: tl.constexpr,
        JOINED: tl.constexpr, FOLD: tl.constexpr,
    ):  # fmt: skip
        """What a scores program keeps of one of its KV heads: `_folded_setup`'s (FOLD) or `_head_setup`'s."""
        if FOLD:
            setup = _folded_setup(
                Q, W, RANKS, OFFSETS, CODEC, head, b, stride_qb, stride_qh, stride_wd, row_len, dims, scaling,
                HALF, R1, R2, ALIGNED, SLOTS, GROUP, ALIGN, JOINED,
            )  # fmt: skip
        else:
            setup = _head_setup(
                Q, W, RANKS, OFFSETS, CODEC, KBIAS, head, b, stride_qb, stride_qh, stride_wd, row_len, dims, g,
                G, HALF, R1, R2, ALIGNED, HAS_BIAS, QUANT, GROUP, SLOTS, ALIGN, JOINED,
            )  # fmt: skip
        return setup

    @triton.jit
    def _scores_kernel(
        Q, ZK, ZK2, POS, VALID, W, RANKS, OFFSETS, CODEC, KBIAS, NORMW, INVF, S, COS, SIN,
        T, TP, tiles_per_split, row_len,
        stride_qb, stride_qh, stride_zb, stride_zt, stride_pb, stride_vb, stride_wd, stride_sb, stride_sh, stride_st,
        stride_cb, stride_ct,
        scaling, rope_scale, eps,
        G: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, BT: tl.constexpr,
        HPP: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        EXACT_ROPE: tl.constexpr, ROPE_TABLE: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
        QUANT: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr,
        ALIGN: tl.constexpr, JOINED: tl.constexpr, TMA: tl.constexpr, FOLD: tl.constexpr, PAIRED: tl.constexpr,
        WORDS: tl.constexpr,
    ):  # fmt: skip
        """
        HPP (1, 2 or 4) KV heads per program: each head's weights and queries stay on the chip for all its tiles, and
        the RoPE of a tile (tables read or angles evaluated) is shared by the HPP heads. Quantized latents (QUANT):
        CODEC holds each head's n8, first code byte, first scale byte and code bytes (padded); ALIGN divides the row
        strides, code bytes and n8 (loads of whole words); HAS8 / HAS4: whether 8-bit / 4-bit groups occur.
        TMA (16-bit aligned latents with RoPE tables): ZK / ZK2 are descriptors of the latents' R1 / R2 column chunks
        and COS / SIN of the tables, each (sequence, token, column) with blocks of one sequence's BT tokens.
        FOLD (G = 1, fp16 tables, 16-bit latents or quantized keys read per scale group, no bias or k-norm): keys are
        never rebuilt; the query is folded into the up-projection and the tables are multiplied by it
        (`_folded_tile_scores`), each next tile's latents loaded while a tile is scored; the HPP heads share the
        tile's tables. JOINED: 16-bit keys' RoPE halves rebuilt by one product a chunk; in the folded pass of
        quantized keys, each scale group's even and odd channels in one product. PAIRED (folded, HPP 2 or 4,
        quantized keys JOINED): two heads' products a tile are one. WORDS (quantized keys unfolded, ALIGN >= 4):
        each token's scales read from their 4-byte words, loads triton copies asynchronously a tile ahead.
        """
        # fp32 scalars whatever launches this (torch.compile passes Python floats as fp64, which made the score math
        # fp64: 0.69 against 0.63 ms a layer at 34 x 32K on the H100, 1.09 against 0.63 with an fp16 scores buffer)
        scaling, rope_scale = tl.cast(scaling, tl.float32), tl.cast(rope_scale, tl.float32)
        eps = tl.cast(eps, tl.float32)
        head0 = tl.program_id(0) * HPP
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        dims = tl.arange(0, HALF)
        g = tl.arange(0, GP)
        i = tl.arange(0, BT)
        setup0 = _program_head(
            Q, W, RANKS, OFFSETS, CODEC, KBIAS, head0, b, stride_qb, stride_qh, stride_wd, row_len, dims, g, scaling,
            G, HALF, R1, R2, ALIGNED, HAS_BIAS, QUANT, GROUP, SLOTS, ALIGN, JOINED, FOLD,
        )  # fmt: skip
        if HPP > 1:
            setup1 = _program_head(
                Q, W, RANKS, OFFSETS, CODEC, KBIAS, head0 + 1, b, stride_qb, stride_qh, stride_wd, row_len, dims, g,
                scaling, G, HALF, R1, R2, ALIGNED, HAS_BIAS, QUANT, GROUP, SLOTS, ALIGN, JOINED, FOLD,
            )  # fmt: skip
        if HPP > 2:
            setup2 = _program_head(
                Q, W, RANKS, OFFSETS, CODEC, KBIAS, head0 + 2, b, stride_qb, stride_qh, stride_wd, row_len, dims, g,
                scaling, G, HALF, R1, R2, ALIGNED, HAS_BIAS, QUANT, GROUP, SLOTS, ALIGN, JOINED, FOLD,
            )  # fmt: skip
            setup3 = _program_head(
                Q, W, RANKS, OFFSETS, CODEC, KBIAS, head0 + 3, b, stride_qb, stride_qh, stride_wd, row_len, dims, g,
                scaling, G, HALF, R1, R2, ALIGNED, HAS_BIAS, QUANT, GROUP, SLOTS, ALIGN, JOINED, FOLD,
            )  # fmt: skip
        inv_freq = tl.load(INVF + dims)
        if not EXACT_ROPE and not ROPE_TABLE:
            step_cos, step_sin = _reduced_cos_sin(i.to(tl.float32)[:, None] * inv_freq[None, :])
        norm_lo = tl.load(NORMW + dims).to(tl.float32)  # unused without HAS_NORM
        norm_hi = tl.load(NORMW + HALF + dims).to(tl.float32)

        zk = (ZK, ZK2) if TMA else ZK
        first = split * tiles_per_split
        if FOLD:
            latents0 = _folded_latents(
                zk, first, T, b, stride_zb, stride_zt, setup0, BT, R1, R2, TMA, SLOTS, GROUP // 2, HAS8, HAS4, ALIGN
            )
            if HPP > 1:
                latents1 = _folded_latents(
                    zk, first, T, b, stride_zb, stride_zt, setup1, BT, R1, R2, TMA, SLOTS, GROUP // 2, HAS8, HAS4, ALIGN
                )
            if HPP > 2:
                latents2 = _folded_latents(
                    zk, first, T, b, stride_zb, stride_zt, setup2, BT, R1, R2, TMA, SLOTS, GROUP // 2, HAS8, HAS4, ALIGN
                )
                latents3 = _folded_latents(
                    zk, first, T, b, stride_zb, stride_zt, setup3, BT, R1, R2, TMA, SLOTS, GROUP // 2, HAS8, HAS4, ALIGN
                )
            if PAIRED:
                pairs01 = _paired_folds(setup0, setup1, SLOTS)
                if HPP > 2:
                    pairs23 = _paired_folds(setup2, setup3, SLOTS)
        for tile in range(first, first + tiles_per_split):
            t = tile * BT + i
            in_range = t < T
            stored = t < TP
            keep = in_range
            if HAS_VALID:
                keep = keep & (tl.load(VALID + b * stride_vb + t, mask=in_range, other=0) != 0)
            if TMA:
                at = (tl.program_id(2), tile * BT)
                cos = _described_tile(COS, at, 0)
                sin = _described_tile(SIN, at, 0)
            elif ROPE_TABLE:  # cos/sin of every cached position (16-bit, as transformers rounds them), from the cache
                table = b * stride_cb + t[:, None] * stride_ct + dims[None, :]
                # (0 past the context, which the masked copies write anyway: no selects; those keys are masked out)
                cos = tl.load(COS + table, mask=in_range[:, None], other=0.0)
                sin = tl.load(SIN + table, mask=in_range[:, None], other=0.0)
            else:
                pos = tl.load(POS + b * stride_pb + t, mask=in_range, other=0)
                if EXACT_ROPE:
                    cos, sin = _reduced_cos_sin(pos.to(tl.float32)[:, None] * inv_freq[None, :])
                else:
                    # positions of a tile are consecutive (generate() gives that, padding aside): anchor at the last
                    last = tl.minimum(tile * BT + BT - 1, T - 1)
                    start = tl.load(POS + b * stride_pb + last) - (last - tile * BT)
                    consecutive = tl.max(tl.where(keep & (pos != start + i), 1, 0), 0) == 0
                    if consecutive:
                        base_cos, base_sin = _reduced_cos_sin(start.to(tl.float32) * inv_freq)
                        cos = base_cos[None, :] * step_cos - base_sin[None, :] * step_sin
                        sin = base_sin[None, :] * step_cos + base_cos[None, :] * step_sin
                    else:
                        cos, sin = _reduced_cos_sin(pos.to(tl.float32)[:, None] * inv_freq[None, :])
                cos = cos * rope_scale
                sin = sin * rope_scale
            if (TMA or ROPE_TABLE) and not FOLD:  # (FOLD multiplies the fp16 tables on the tensor cores)
                cos, sin = cos.to(tl.float32), sin.to(tl.float32)
            if TMA:
                zrow = at
            else:
                zrow = b * stride_zb + t * stride_zt
            if QUANT:  # (the row length and the batch stride are multiples of ALIGN bytes)
                zrow = tl.multiple_of(zrow, ALIGN)
            srow = b * stride_sb
            if FOLD:  # (the HPP heads share the tile's tables)
                shared = (
                    zk, tile, T, b, stride_zb, stride_zt, keep, stored, S, srow, t, cos, sin, stride_sh, stride_st
                )  # fmt: skip
                if PAIRED:
                    latents0, latents1 = _paired_step(
                        shared, latents0, latents1, head0, setup0, setup1, pairs01,
                        BT, R1, R2, TMA, SLOTS, GROUP, HAS8, HAS4, ALIGN,
                    )  # fmt: skip
                    if HPP > 2:
                        latents2, latents3 = _paired_step(
                            shared, latents2, latents3, head0 + 2, setup2, setup3, pairs23,
                            BT, R1, R2, TMA, SLOTS, GROUP, HAS8, HAS4, ALIGN,
                        )  # fmt: skip
                else:
                    latents0 = _folded_step(
                        shared, latents0, head0, setup0, BT, R1, R2, TMA, SLOTS, GROUP, HAS8, HAS4, ALIGN
                    )
                    if HPP > 1:
                        latents1 = _folded_step(
                            shared, latents1, head0 + 1, setup1, BT, R1, R2, TMA, SLOTS, GROUP, HAS8, HAS4, ALIGN
                        )
                    if HPP > 2:
                        latents2 = _folded_step(
                            shared, latents2, head0 + 2, setup2, BT, R1, R2, TMA, SLOTS, GROUP, HAS8, HAS4, ALIGN
                        )
                        latents3 = _folded_step(
                            shared, latents3, head0 + 3, setup3, BT, R1, R2, TMA, SLOTS, GROUP, HAS8, HAS4, ALIGN
                        )
            else:
                shared = (
                    zk, zrow, in_range, keep, stored, S, srow, t, norm_lo, norm_hi, eps, cos, sin, scaling, stride_sh,
                    stride_st,
                )  # fmt: skip
                _head_tile_scores(
                    shared, head0, g, setup0, G, HALF, R1, R2, PRECISION, HAS_BIAS, HAS_NORM, QUANT, GROUP, SLOTS,
                    HAS8, HAS4, ALIGN, JOINED, TMA, WORDS,
                )  # fmt: skip
                if HPP > 1:
                    _head_tile_scores(
                        shared, head0 + 1, g, setup1, G, HALF, R1, R2, PRECISION, HAS_BIAS, HAS_NORM, QUANT, GROUP,
                        SLOTS, HAS8, HAS4, ALIGN, JOINED, TMA, WORDS,
                    )  # fmt: skip
                if HPP > 2:
                    _head_tile_scores(
                        shared, head0 + 2, g, setup2, G, HALF, R1, R2, PRECISION, HAS_BIAS, HAS_NORM, QUANT, GROUP,
                        SLOTS, HAS8, HAS4, ALIGN, JOINED, TMA, WORDS,
                    )  # fmt: skip
                    _head_tile_scores(
                        shared, head0 + 3, g, setup3, G, HALF, R1, R2, PRECISION, HAS_BIAS, HAS_NORM, QUANT, GROUP,
                        SLOTS, HAS8, HAS4, ALIGN, JOINED, TMA, WORDS,
                    )  # fmt: skip

    @triton.jit
    def _scores_tile(S, b, h, head_ok, tile, T, TP, stride_sb, stride_sh, stride_st, BT: tl.constexpr):
        """
        A tile's token indices, which of them exist, and their scores (HP, BT) of every query head (-inf: none). The
        buffer holds TP tokens (whole tiles, -inf beyond T): masked by TP, a multiple of 16, the loads vectorize.
        """
        t = tile * BT + tl.arange(0, BT)
        in_range = t < T
        mask = head_ok[:, None] & (t < TP)[None, :]
        s = tl.load(S + b * stride_sb + h[:, None] * stride_sh + t[None, :] * stride_st, mask=mask, other=float("-inf"))
        return t, in_range, s.to(tl.float32)

    @triton.jit
    def _softmax_step(s, m_i, l_i):
        """Online softmax over a tile of scores (HP, BT): the weights, the rescale of what came before, new max/sum."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _value_tile(
        ZV, row, in_range, block, rv, rv_ok, v_rank, v_n8, v_scales, v_size, scale, DTYPE: tl.constexpr,
        RVB: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, HAS8: tl.constexpr,
        HAS4: tl.constexpr, ALIGN: tl.constexpr, APART: tl.constexpr,
    ):  # fmt: skip
        """
        A tile's value latents, columns `rv` (BT, RVB), by pointers: 16-bit, or dequantized from the codec's rows; per
        scale group (GROUPS > 0, `scale` their `_group_scales`), with APART the even and the odd channels apart, (BT,
        RVB / 2) each.
        """
        if GROUPS > 0:
            even, odd = _group_latents(
                ZV, row, in_range, block * GROUPS, v_rank, v_n8, scale,
                tl.multiple_of(v_size, ALIGN), GROUPS, GROUP // 2, DTYPE, HAS8, HAS4, ALIGN,
            )  # fmt: skip
            if APART:
                z = tl.reshape(even, [row.shape[0], RVB // 2]), tl.reshape(odd, [row.shape[0], RVB // 2])
            else:
                z = tl.reshape(tl.join(even, odd), [row.shape[0], RVB])  # channel order: group, pair, even/odd
        elif QUANT:
            z = _dequantized(ZV, row, in_range, rv, v_rank, (v_n8, 0, v_scales, v_size), GROUP, DTYPE)
        else:
            z = tl.load(ZV + row[:, None] + rv[None, :], mask=in_range[:, None] & rv_ok[None, :], other=0.0)
        return z

    @triton.jit
    def _values_kernel(
        S, ZV, ACC, MAX, SUM, LIKE,
        T, TP, tiles_per_split, num_heads, v_rank, v_n8, v_scales, v_size,
        stride_sb, stride_sh, stride_st, stride_zb, stride_zt, stride_ab, stride_as, stride_ah, stride_mb, stride_ms,
        HP: tl.constexpr, RVB: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr,
        GROUP: tl.constexpr, GROUPS: tl.constexpr, HAS8: tl.constexpr, HAS4: tl.constexpr, ALIGN: tl.constexpr,
        TMA: tl.constexpr, APART: tl.constexpr, PREFETCH: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        """
        TMA (16-bit latents): S and ZV are descriptors of the (sequence, head, token) scores and the (sequence, token,
        column) latents, with blocks of one sequence's HP heads x BT tokens and BT tokens x RVB columns.
        QUANT: the value latents are the codec's uint8 rows (v_n8 leading channels in 8 bits; codes from byte 0,
        v_size bytes padded; scales from byte v_scales), dequantized here: per value, or with GROUPS > 0 per scale
        group, the program's RVB = GROUPS * GROUP columns being its groups' (APART: even and odd channels multiplied
        and accumulated apart, no interleaving per tile). ALIGN divides the row strides, v_n8 and v_size; HAS8 / HAS4:
        whether 8-bit / 4-bit groups occur. LIKE: a tensor of the dtype they are dequantized to. PREFETCH: each next
        tile's scales (by group) loaded while a tile is worked on, not waited for at once (2-byte loads are not
        copied asynchronously). WORDS (ALIGN >= 4): the scales read from their 4-byte words, which are.
        """
        block = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        h = tl.arange(0, HP)
        if GROUPS > 0:
            _, base, end = _slot(block * GROUPS + tl.arange(0, GROUPS), v_rank, v_n8, GROUP // 2)
            if APART:  # the even channels (the odd ones next to them)
                rv = base[:, None] + 2 * tl.arange(0, GROUP // 2)[None, :]
                rv_odd_ok = tl.reshape(rv + 1 < end[:, None], [RVB // 2])
            else:
                rv = base[:, None] + tl.arange(0, GROUP)[None, :]
            rv_ok = tl.reshape(rv < end[:, None], [rv.shape[0] * rv.shape[1]])
            rv = tl.reshape(rv, [rv.shape[0] * rv.shape[1]])
        else:
            rv = block * RVB + tl.arange(0, RVB)
            rv_ok = rv < v_rank
        acc = tl.zeros([HP, rv.shape[0]], tl.float32)
        if APART:
            acc_odd = tl.zeros([HP, rv.shape[0]], tl.float32)
        head_ok = h < num_heads
        m_i = tl.full([HP], float("-inf"), tl.float32)
        l_i = tl.zeros([HP], tl.float32)
        first = split * tiles_per_split
        if GROUPS > 0 and PREFETCH:  # the first tile's scales
            t = first * BT + tl.arange(0, BT)
            scale = _group_scales(
                ZV, b * stride_zb + t * stride_zt, t < T, block * GROUPS, v_rank, v_n8, v_scales, GROUPS, GROUP // 2,
                WORDS and ALIGN >= 4,
            )  # fmt: skip
        for tile in range(first, first + tiles_per_split):
            if TMA:  # (heads past num_heads read 0, not -inf: their rows are never stored)
                at = (tl.program_id(2), tile * BT)
                s = _described_tile(S, (at[0], 0), at[1]).to(tl.float32)
                z = _described_tile(ZV, at, block * RVB)
            else:
                t, in_range, s = _scores_tile(S, b, h, head_ok, tile, T, TP, stride_sb, stride_sh, stride_st, BT)
                row = b * stride_zb + t * stride_zt
                tile_scale = 0.0  # (by group: the tile's scales)
                if GROUPS > 0:
                    if PREFETCH:
                        tile_scale = scale
                        scale = _group_scales(
                            ZV, row + BT * stride_zt, t + BT < T, block * GROUPS, v_rank, v_n8, v_scales, GROUPS,
                            GROUP // 2, WORDS and ALIGN >= 4,
                        )  # fmt: skip
                    else:
                        tile_scale = _group_scales(
                            ZV, row, in_range, block * GROUPS, v_rank, v_n8, v_scales, GROUPS, GROUP // 2,
                            WORDS and ALIGN >= 4,
                        )  # fmt: skip
                z = _value_tile(
                    ZV, row, in_range, block, rv, rv_ok, v_rank, v_n8, v_scales, v_size, tile_scale,
                    LIKE.dtype.element_ty, RVB, QUANT, GROUP, GROUPS, HAS8, HAS4, ALIGN, APART,
                )  # fmt: skip
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
            if APART:
                p = p.to(z[0].dtype)
                acc = tl.dot(p, z[0], acc * alpha[:, None], input_precision=PRECISION)
                acc_odd = tl.dot(p, z[1], acc_odd * alpha[:, None], input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(z.dtype), z, acc * alpha[:, None], input_precision=PRECISION)
        out = ACC + b * stride_ab + split * stride_as + h[:, None] * stride_ah + rv[None, :]
        tl.store(out, acc, mask=head_ok[:, None] & rv_ok[None, :])
        if APART:
            tl.store(out + 1, acc_odd, mask=head_ok[:, None] & rv_odd_ok[None, :])
        if block == 0:
            tl.store(MAX + b * stride_mb + split * stride_ms + h, m_i, mask=head_ok)
            tl.store(SUM + b * stride_mb + split * stride_ms + h, l_i, mask=head_ok)

    @triton.jit
    def _merge_kernel(
        ACC, MAX, SUM, OUT,
        n_splits, v_rank,
        stride_ab, stride_as, stride_ah, stride_mb, stride_ms, stride_ob, stride_oh,
        RVB: tl.constexpr, SB: tl.constexpr,
    ):  # fmt: skip
        """One program per (value block, query head, sequence) combines the head's splits, SB of them per step."""
        block = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rv = block * RVB + tl.arange(0, RVB)
        m_i = tl.max(tl.full([SB], float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros([SB], tl.float32), 0)
        acc = tl.zeros([RVB], tl.float32)
        for first in range(0, n_splits, SB):
            split = first + tl.arange(0, SB)
            ok = split < n_splits
            m = tl.load(MAX + b * stride_mb + split * stride_ms + h, mask=ok, other=float("-inf"))
            l_s = tl.load(SUM + b * stride_mb + split * stride_ms + h, mask=ok, other=0.0)
            a = tl.load(ACC + b * stride_ab + split[:, None] * stride_as + h * stride_ah + rv[None, :],
                        mask=ok[:, None] & (rv < v_rank)[None, :], other=0.0)  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(m, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            weight, old = tl.exp(m - m_safe), tl.exp(m_i - m_safe)
            l_i = l_i * old + tl.sum(l_s * weight, 0)
            acc = acc * old + tl.sum(a * weight[:, None], 0)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        tl.store(OUT + b * stride_ob + h * stride_oh + rv, out.to(OUT.dtype.element_ty), mask=rv < v_rank)


DEFAULT_CONFIG = {
    "block_tokens": 64,  # cached tokens per tile (both passes)
    "value_block": "auto",  # value-latent columns per program of the values pass: auto = an eighth of the rank (a
    # quarter if quantized, from batch 8), 32..128
    "scores_programs_per_sm": 8,  # context splits give each pass about this many programs per multiprocessor
    "values_programs_per_sm": 4,  # (more splits for the values pass would make the merge longer)
    "scores_splits": 0,  # context splits of the scores pass, or 0: chosen as below
    "values_splits": 0,  # the same for the values pass
    "scores_fewer_splits": (2, 16),  # but down to 2 programs per SM while splits would get fewer than 16 tiles each
    # (each program loads its head's up-projection once: at batch 1 that prologue outweighs a few tiles)
    "scores_resident": 3,  # scores programs resident per multiprocessor (154-167 registers): down to half the splits
    # where whole waves fill better (H100: GQA B1 64K 0.103 -> 0.091 ms, MHA B1 16K 0.099 -> 0.089; 0 turns it off)
    "values_fewer_splits": (2, 16),  # the same for the values pass (batch 1: fewer partial results to merge)
    "scores_warps": 4,
    "scores_stages": 1,  # with angle addition
    "scores_stages_tables": 3,  # with RoPE tables (measured best on the H100 for each: 3 beats 2 by 8-24%)
    "values_warps": "auto",  # auto: 8 for blocks of 128 columns or more, else 4
    "values_stages": 3,
    "token_major_scores": False,  # scores buffer as (B, T, Hq) instead of (B, Hq, T)
    "rope_table": False,  # compute rope_tables() here when the caller passes none (costs more than angle addition)
    "heads_per_program": "auto",  # KV heads per program of the scores pass (1, 2 or 4), sharing each tile's RoPE
    # tables, each keeping its weights. auto: 2 for the folded pass of quantized keys (H100,
    # 4-bit MHA scores pass B16 0.918 -> 0.799 ms, B1 64K 0.126 -> 0.113), else 1 (the unfolded pass's weights then
    # need more registers than the shared tables save: GQA B16 0.352 -> 0.398, MHA 1.304 -> 1.310). The folded pass
    # with 4 (not timed): 243 registers, 2 programs a multiprocessor (`sass_report.py`; 128 and 3 with 2)
    "rank_pad": 16,  # key-rank tiles padded to a multiple of this (two power-of-two dots), or 0: next power of two
    "aligned_latents": True,  # 16-byte key-latent loads from an 8-aligned column (when the row length allows)
    "grouped_values": True,  # quantized values dequantized per scale group (else per value, as groups of 16 are)
    "key_scale_words": False,  # the unfolded pass of quantized keys by group (rows 4-byte aligned): each token's fp16
    # scale read as half of its 4-byte word, which triton copies asynchronously a tile ahead (its 2-byte loads it waits
    # for in the tile: sass_report, 4-bit GQA B16, LDG.E.U16 -> LDGSTS.E.64, 529 -> 549 loop instructions). Not timed
    "grouped_keys": True,  # quantized keys: dequantized per scale group (whole code bytes, one scale per token)
    "joined_halves": True,  # keys rebuilt by one product of 2 x HALF columns a chunk and scored by one over the head
    # dimension (16-bit latents): 3 tensor-core waits a tile instead of 6, 154 registers instead of 167; H100 scores
    # pass GQA B16 0.269 -> 0.264 ms, MHA B16 0.947 -> 0.935
    "joined_groups": True,  # the folded pass of quantized keys: each scale group's even and odd channels in one cos
    # and one sin product (N = GROUP) instead of two each (N = GROUP / 2): 466 loop instructions against 558, 4
    # tensor-core waits a tile against 8, 116 registers against 128 (sass_report, 4-bit MHA B16). H100 4-bit scores
    # pass ms, MHA B16 / B8 / B1 64K / B1 16K: 0.804 -> 0.690 / 0.217 -> 0.187 / 0.113 -> 0.097 / 0.033 -> 0.028
    "paired_heads": True,  # the folded pass with 2 or 4 KV heads a program (quantized keys: with joined_groups): two
    # heads' products of a tile as one, each scale group's (or 16-bit rank chunk's) columns of both heads side by
    # side (4-bit MHA B16: N = 2 GROUP, 486 loop instructions, 2 tensor-core waits a tile, 124 registers). H100 4-bit,
    # the same rows: 0.603 / 0.170 / 0.088 / 0.027 ms (with 4 heads a program 0.646 / 0.179 / 0.098 / 0.028)
    "half_scores": "auto",  # fp16 scores buffer for 16-bit inputs (fp32 inputs: always fp32); auto: where G >= 2
    "scores_tma": "auto",  # scores pass: 16-bit aligned latents and RoPE tables by TMA (Hopper or the interpreter;
    # not under torch.compile): 124-128 registers instead of 154-155, same results bit for bit; H100 scores pass MHA
    # B16 0.939 -> 0.919 ms, GQA B16 0.265 -> 0.256, batch 1 the same. auto: where the ~0.1 ms of host time a call
    # spends making descriptors is hidden (`_tma_pays`): CUDA-graph capture, or key latents of TMA_AUTO_BYTES or more
    "folded_scores": "auto",  # G = 1 with RoPE tables (no bias, no k-norm): keys never rebuilt; the query folded into
    # the up-projection, the tables times that (tensor cores) weight each latent channel. auto: quantized keys only.
    # H100, scores pass ms, MHA B16 / B1 64K: 4-bit 1.029 -> 0.912 / 0.138 -> 0.126 (graph, whole call, 1.687 ->
    # 1.559 ms at B16); bf16 slower, 0.906 -> 1.145 / 0.136 -> 0.156 (each tile is 4 small products (N = 32, 16) on
    # the same 16 KB of tables, against the unfolded pass's 2 wide ones; with one rank chunk, 2 products of N = 64,
    # 1.016 / 0.139; with two KV heads a program 1.118 / 0.170)
    "values_pairs_apart": "auto",  # quantized values by scale group: even and odd channels in products of their
    # own, never interleaved per tile (sass_report, 4-bit MHA B16: 469 loop instructions against 571). auto: where
    # G = 1. H100 4-bit values pass ms: MHA B16 0.600 -> 0.542, B1 64K 0.101 -> 0.097; GQA B16 0.173 -> 0.378 (1070
    # loop instructions and 249 registers against 633 and 150; at 128 columns and 8 warps 0.183)
    "values_prefetch": True,  # quantized values by group: each next tile's scales loaded a tile ahead, not waited
    # for at once (2-byte loads are not copied asynchronously). H100 4-bit values pass ms, MHA / GQA B16: 0.596 ->
    # 0.548 / 0.175 -> 0.162
    "value_scale_words": False,  # quantized values by group (rows 4-byte aligned): each fp16 scale read as half of its
    # 4-byte word, which triton copies asynchronously (sass_report, 4-bit B16 with values_prefetch off: no 2-byte load
    # waited for in the loop; MHA 581 loop instructions against the prefetch's 567, GQA 662 against 642). Not timed
    "values_tma": False,  # values pass: scores and 16-bit value latents by TMA. Off: on the H100 its results differ
    # from the pointer loads by ~3e-3 at batch >= 4 (exact at batch 1; cause not found) and it is slower at MHA B16
}


def _alloc(*shape: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scratch buffers of the kernels; tests replace this to poison them."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (>= 1), as triton.next_power_of_2 computes it, without its per-call wrapper cost
    (host code runs once per layer and decode step)."""
    n = max(n, 1) - 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def _next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, _pow2_at_least(n))


def _rank_chunks(k_ranks: list[int], pad: int, aligned: bool) -> tuple[int, int]:
    """Column chunks (R1, R2) covering every head's rank (plus up to 7 leading columns when aligned)."""
    need = max(k_ranks) + (7 if aligned else 0)
    if not pad:
        return _next_pow2(need), 0
    need = max(16, -(-need // pad) * pad)
    first = _pow2_at_least(need)
    if first == need:
        return first, 0
    first //= 2
    return first, _next_pow2(need - first)


def _key_slots(codec, grouped: bool) -> int:
    """Scale groups per head for the grouped key rebuild (the most of any head), or 0: dequantize per value."""
    group = codec.group
    if not grouped or group < 32 or group & (group - 1):  # even/odd halves of a group feed dots of >= 16 rows
        return 0
    slots = max(-(-a // group) + -(-(r - a) // group) for r, a in zip(codec.ranks, codec.n8))
    return slots if slots <= 3 else 0


_DEVICES: dict[str, tuple[int, int]] = {}


def _device_info(device: torch.device) -> tuple[int, int]:
    """The device's multiprocessor count and major compute capability ((4, 0) off CUDA), looked up once per device."""
    key = str(device)
    if key not in _DEVICES:
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        _DEVICES[key] = (props.multi_processor_count, props.major) if props is not None else (4, 0)
    return _DEVICES[key]


def _multiprocessors(device: torch.device) -> int:
    return _device_info(device)[0]


def _splits(
    tiles: int,
    programs_per_split: int,
    device: torch.device,
    per_sm: int,
    fewest_per_sm: int = 0,
    tiles_each: int = 1,
    resident: int = 0,
) -> tuple[int, int]:
    """
    (splits, tiles per split) giving the launch about `per_sm` programs per multiprocessor; or, where that leaves
    fewer than `tiles_each` tiles to a split, fewer splits (down to `fewest_per_sm` programs per multiprocessor).
    With `resident` (the programs that fit a multiprocessor at once), down to half as many splits where that fills
    the last wave of programs better (`_wave_fill`).
    """
    sms = _multiprocessors(device)
    programs = max(programs_per_split, 1)
    splits = -(-per_sm * sms // programs)
    if fewest_per_sm:
        splits = min(splits, max(-(-fewest_per_sm * sms // programs), tiles // tiles_each))
    splits = max(1, min(tiles, splits))
    if resident:
        slots = resident * sms
        # (judged by the splits launched: ceil(tiles / per_split) for s splits' per_split)
        splits = max(
            range(-(-splits // 2), splits + 1),
            key=lambda s: (_wave_fill(-(-tiles // -(-tiles // s)) * programs, slots), s),
        )
    per_split = -(-tiles // splits)
    return -(-tiles // per_split), per_split


def _wave_fill(programs: int, slots: int) -> float:
    """The share of `slots` (programs resident at once on the device) that `programs` keep busy over their waves."""
    return programs / (-(-programs // slots) * slots)


_RANK_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rank_tables(ranks: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks, column offsets) of the KV heads as int32 device tensors, made once per layout and device."""
    key = (tuple(ranks), str(device))
    if key not in _RANK_TABLES:
        offsets = [sum(ranks[:j]) for j in range(len(ranks))]
        _RANK_TABLES[key] = (
            torch.tensor(ranks, dtype=torch.int32, device=device),
            torch.tensor(offsets, dtype=torch.int32, device=device),
        )
    return _RANK_TABLES[key]


_CODEC_TABLES: dict[tuple, torch.Tensor] = {}


def _padded_code_bytes(codec) -> list[int]:
    """Each block's code bytes rounded up to the codec's alignment (what the next part of the row leaves free)."""
    return [-(-size // codec.align) * codec.align for size in codec.code_sizes]


def _codec_table(codec, device: torch.device) -> torch.Tensor:
    """
    (blocks, 4) int32 on `device`, made once per `LatentCodec`: each block's 8-bit channels, first code byte, first
    scale byte and code bytes (padded).
    """
    key = (tuple(codec.ranks), tuple(codec.n8), codec.group, codec.align, str(device))
    if key not in _CODEC_TABLES:
        rows = list(zip(codec.n8, codec.code_offsets, codec.scale_offsets, _padded_code_bytes(codec)))
        _CODEC_TABLES[key] = torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 4)
    return _CODEC_TABLES[key]


def _codec_flags(codec, rows: torch.Tensor) -> dict:
    """
    The kernels' HAS8 / HAS4 (whether 8-bit / 4-bit groups occur) and ALIGN: the largest power of two up to 16
    bytes that divides the rows' strides and offset, every block's first code byte and padded code bytes, and the
    n8 of every block with 4-bit codes, so that the codes are read in whole words. (The storage itself is taken to
    start 16-byte aligned, as torch's allocators give.)
    """
    has4 = any(a < r for a, r in zip(codec.n8, codec.ranks))
    values = [rows.stride(0), rows.stride(1), rows.storage_offset(), *codec.code_offsets, *_padded_code_bytes(codec)]
    values += [a for a, r in zip(codec.n8, codec.ranks) if a < r]  # (a block of 8 bits only reads no 4-bit codes)
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return {"HAS8": any(a > 0 for a in codec.n8), "HAS4": has4, "ALIGN": align}


def _tma_capable(device: torch.device, *tensors: torch.Tensor) -> bool:
    """
    Whether a pass can read these 3-D tensors by TMA: a Hopper-or-later GPU (or the interpreter), a contiguous last
    dimension, and 16-byte aligned strides and start (the storage taken to start 16-byte aligned).
    """
    if TensorDescriptor is None or torch.compiler.is_compiling():  # (compiled: not checked on the GPU yet)
        return False
    if device.type == "cuda" and _device_info(device)[1] < 9:
        return False
    return all(
        x.stride(-1) == 1 and not any(v * x.element_size() % 16 for v in (*x.stride()[:-1], x.storage_offset()))
        for x in tensors
    )


TMA_AUTO_BYTES = 1 << 28  # eager calls on the H100: GQA B8 16K (80 MB of key latents) 0.267 -> 0.399 ms with TMA,
# host-bound; MHA B8 16K and GQA B16 32K (0.32 GB) 0.486 -> 0.481 and 0.511 -> 0.500, MHA B16 32K 1.816 -> 1.748


def _tma_pays(device: torch.device, nbytes: int) -> bool:
    """
    Whether TMA's host cost (descriptors made and encoded at every launch) is hidden: off CUDA (the interpreter), while
    a CUDA graph is being captured (replays reuse the descriptors), or behind the GPU work of `nbytes` of key latents.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return True
    return nbytes >= TMA_AUTO_BYTES


def latent_decode_attention(
    query: torch.Tensor,
    key_latents: torch.Tensor,
    value_latents: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    k_up_weight: torch.Tensor,
    k_ranks: list[int],
    k_bias: torch.Tensor | None,
    k_norm: torch.nn.Module | None,
    inv_freq: torch.Tensor,
    rope_scale: float,
    v_up_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    scaling: float,
    config: dict | None = None,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    codecs: tuple | None = None,
) -> torch.Tensor:
    """
    The Triton version of `latent_decode_reference` (same arguments, same result); fp16, bf16 or fp32. `tables`:
    `rope_tables(...)` of these positions (16-bit inputs only), which makes the scores pass about twice as fast;
    without them RoPE uses angle addition. `config` overrides the launch settings of `DEFAULT_CONFIG`. `codecs`:
    the layer's (key, value) `LatentCodec`s when the latents are quantized; `key_latents` and `value_latents` are
    then their uint8 rows, dequantized on the fly (the reference of that is the codecs' `decode`).
    """
    if config and set(config) - set(DEFAULT_CONFIG):
        raise ValueError(f"unknown launch settings {sorted(set(config) - set(DEFAULT_CONFIG))}")
    cfg = {**DEFAULT_CONFIG, **config} if config else DEFAULT_CONFIG
    block_tokens, value_block = cfg["block_tokens"], cfg["value_block"]
    batch, num_heads, head_dim = query.shape
    tokens = key_latents.shape[1]
    num_kv_heads, v_rank = len(k_ranks), value_latents.shape[-1]
    device = query.device
    quant = codecs is not None
    if quant:
        k_codec, v_codec = codecs
        if key_latents.dtype != torch.uint8 or list(k_codec.ranks) != list(k_ranks) or len(v_codec.ranks) != 1:
            raise ValueError(
                "quantized latents: uint8 rows of a key codec with these ranks and a one-block value codec"
            )
        v_rank, group = v_codec.ranks[0], k_codec.group
        codec_table = _codec_table(k_codec, device)
    groups = num_heads // num_kv_heads
    key_latents = key_latents if key_latents.stride(-1) == 1 else key_latents.contiguous()
    value_latents = value_latents if value_latents.stride(-1) == 1 else value_latents.contiguous()
    if quant:
        for rows in (key_latents, value_latents):  # the fp16 scales are loaded as such
            if rows.storage_offset() % 2 or any(stride % 2 for stride in rows.stride()[:-1]):
                raise ValueError("quantized latent rows must start at an even byte with even strides (whole rows)")
        k_flags, v_flags = _codec_flags(k_codec, key_latents), _codec_flags(v_codec, value_latents)
    query = query.contiguous()
    ranks, offsets = _rank_tables(k_ranks, device)
    positions = positions if positions.dtype == torch.int32 else positions.to(torch.int32)
    valid_arg = valid.to(torch.int8) if valid is not None else positions
    inv_freq = inv_freq if inv_freq.dtype == torch.float32 else inv_freq.float()
    norm_weight = k_norm.weight if k_norm is not None else inv_freq
    eps = float(getattr(k_norm, "variance_epsilon", 1e-6)) if k_norm is not None else 0.0
    exact = query.dtype == torch.float32

    if value_block == "auto":  # measured best on the H100: eight programs per sequence and split for 16-bit latents,
        # four for quantized ones from batch 8 (GQA 4-bit, B16 32K: values pass 0.216 -> 0.172 ms, as each program
        # re-reads the scores; at batch 1 eight stay faster: 0.014 against 0.015 ms)
        per_program = 4 if quant and batch >= 8 else 8
        value_block = min(128, max(32, _pow2_at_least(max(1, v_rank // per_program))))
    values_warps = cfg["values_warps"] if cfg["values_warps"] != "auto" else (8 if value_block >= 128 else 4)
    tiles = _cdiv(tokens, block_tokens)
    precision = "ieee" if exact else "tf32"
    row_len = key_latents.shape[-1]
    aligned = bool(cfg["aligned_latents"]) and row_len % 8 == 0 and key_latents.stride(1) % 8 == 0 and not quant
    if not quant:
        codec_table = ranks
        k_flags = v_flags = {"HAS8": False, "HAS4": False, "ALIGN": 1}
        group = 32
    r1, r2 = _rank_chunks(k_ranks, cfg["rank_pad"], aligned)
    use_table = (tables is not None or cfg["rope_table"]) and not exact
    heads_p2 = _next_pow2(num_heads)
    if use_table:
        cos_t, sin_t = tables if tables is not None else rope_tables(positions, inv_freq, rope_scale, query.dtype)
        rope_scale = 1.0  # already in the tables

    slots = _key_slots(k_codec, cfg["grouped_keys"]) if quant else 0
    fold = quant if cfg["folded_scores"] == "auto" else bool(cfg["folded_scores"])
    fold = fold and groups == 1 and use_table and (slots > 0 or not quant)
    fold = fold and k_bias is None and k_norm is None and cos_t.dtype == torch.float16
    hpp = cfg["heads_per_program"]
    if hpp == "auto":  # two KV heads a program for folded quantized keys (each tile's tables read once for both)
        hpp = 2 if fold and quant else 1
    hpp = max(n for n in (1, 2, 4) if n <= hpp and num_kv_heads % n == 0)
    _, per_split = _splits(
        tiles, batch * num_kv_heads // hpp, device, cfg["scores_programs_per_sm"], *cfg["scores_fewer_splits"],
        resident=cfg["scores_resident"],
    )  # fmt: skip
    if cfg["scores_splits"]:
        per_split = -(-tiles // cfg["scores_splits"])
    padded = tiles * block_tokens  # the scores buffer holds whole tiles: aligned rows, stores and loads vectorize
    half = cfg["half_scores"] if cfg["half_scores"] != "auto" else groups >= 2
    scores_dtype = torch.float16 if half and not exact else torch.float32
    if cfg["token_major_scores"]:
        scores = _alloc(batch, padded, num_heads, device=device, dtype=scores_dtype)
        stride_sh, stride_st = scores.stride(2), scores.stride(1)
    else:
        scores = _alloc(batch, num_heads, padded, device=device, dtype=scores_dtype)
        stride_sh, stride_st = scores.stride(1), scores.stride(2)
    if not use_table:
        cos_t = sin_t = scores
    zk = zk2 = key_latents
    tma = bool(cfg["scores_tma"]) and aligned and use_table and _tma_capable(device, key_latents, cos_t, sin_t)
    # ("auto" leaves the folded pass its pointer loads: it prefetches each next tile's latents into registers, where a
    # TMA copy would be waited for at once)
    tma = tma and (
        cfg["scores_tma"] != "auto" or not fold and _tma_pays(device, key_latents.numel() * key_latents.element_size())
    )
    if tma:  # (from_tensor: the form torch.compile traces)
        describe = TensorDescriptor.from_tensor
        zk, zk2 = (describe(key_latents, [1, block_tokens, r]) for r in (r1, r2 or r1))
        cos_t, sin_t = (describe(x[:, :tokens], [1, block_tokens, head_dim // 2]) for x in (cos_t, sin_t))
    joined = bool(cfg["joined_groups"]) if quant and fold else bool(cfg["joined_halves"]) and not quant
    paired = fold and (joined or not quant) and hpp > 1 and bool(cfg["paired_heads"])
    _scores_kernel[(num_kv_heads // hpp, _cdiv(tiles, per_split), batch)](
        query, zk, zk2, positions, valid_arg, k_up_weight, ranks, offsets, codec_table,
        k_bias if k_bias is not None else inv_freq, norm_weight, inv_freq, scores, cos_t, sin_t,
        tokens, padded, per_split, row_len,
        query.stride(0), query.stride(1), key_latents.stride(0), key_latents.stride(1), positions.stride(0),
        valid_arg.stride(0), k_up_weight.stride(0), scores.stride(0), stride_sh, stride_st,
        *(cos_t.strides[:2] if tma else cos_t.stride()[:2]),
        scaling, rope_scale, eps,
        G=groups, GP=_next_pow2(groups), HALF=head_dim // 2, R1=r1, R2=r2, BT=block_tokens, HPP=hpp,
        HAS_VALID=valid is not None, HAS_BIAS=k_bias is not None,
        HAS_NORM=k_norm is not None, EXACT_ROPE=exact,
        ROPE_TABLE=use_table, ALIGNED=aligned, PRECISION=precision, QUANT=quant, GROUP=group,
        SLOTS=slots, **k_flags,
        JOINED=joined, TMA=tma, FOLD=fold, PAIRED=paired, WORDS=bool(cfg["key_scale_words"]),
        num_warps=cfg["scores_warps"], num_stages=cfg["scores_stages_tables" if use_table else "scores_stages"],
    )  # fmt: skip

    # quantized values dequantized per scale group (tiles of whole groups: a power of two of >= 16 channel pairs)
    by_group = quant and cfg["grouped_values"] and group >= 32 and not group & (group - 1)
    apart = groups == 1 if cfg["values_pairs_apart"] == "auto" else bool(cfg["values_pairs_apart"])
    if by_group:
        groups_per_program = max(1, value_block // group)
        v_groups = _cdiv(v_codec.n8[0], group) + _cdiv(v_rank - v_codec.n8[0], group)
        value_programs, value_block = _cdiv(v_groups, groups_per_program), groups_per_program * group
    else:
        groups_per_program = 0
        value_programs = _cdiv(v_rank, value_block)
    v_splits, v_per_split = _splits(
        tiles, batch * value_programs, device, cfg["values_programs_per_sm"], *cfg["values_fewer_splits"]
    )
    if cfg["values_splits"]:
        v_per_split = -(-tiles // cfg["values_splits"])
        v_splits = -(-tiles // v_per_split)
    partial = _alloc(batch, v_splits, num_heads, v_rank, device=device)
    maxes = _alloc(batch, v_splits, num_heads, device=device)
    sums = _alloc(batch, v_splits, num_heads, device=device)
    s_arg, zv = scores, value_latents
    values_tma = bool(cfg["values_tma"]) and not quant and not cfg["token_major_scores"]
    values_tma = values_tma and _tma_capable(device, value_latents, scores)
    if values_tma:
        s_arg = TensorDescriptor.from_tensor(scores, [1, heads_p2, block_tokens])
        zv = TensorDescriptor.from_tensor(value_latents, [1, block_tokens, value_block])
    _values_kernel[(value_programs, v_splits, batch)](
        s_arg, zv, partial, maxes, sums, query,
        tokens, padded, v_per_split, num_heads, v_rank, *((v_codec.n8[0], v_codec.scale_offsets[0],
        _padded_code_bytes(v_codec)[0]) if quant else (0, 0, 0)),
        scores.stride(0), stride_sh, stride_st, value_latents.stride(0), value_latents.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), maxes.stride(0), maxes.stride(1),
        HP=heads_p2, RVB=value_block, BT=block_tokens, PRECISION=precision, QUANT=quant, GROUP=group,
        GROUPS=groups_per_program, **v_flags, TMA=values_tma, APART=by_group and apart,
        PREFETCH=bool(cfg["values_prefetch"]), WORDS=bool(cfg["value_scale_words"]),
        num_warps=values_warps, num_stages=cfg["values_stages"],
    )  # fmt: skip
    aggregated = torch.empty(batch, num_heads, v_rank, dtype=query.dtype, device=device)
    _merge_kernel[(_cdiv(v_rank, value_block), num_heads, batch)](
        partial, maxes, sums, aggregated,
        v_splits, v_rank,
        partial.stride(0), partial.stride(1), partial.stride(2), maxes.stride(0), maxes.stride(1),
        aggregated.stride(0), aggregated.stride(1),
        RVB=value_block, SB=16,
    )  # fmt: skip
    # one (batch * G, v_rank) x (v_rank, head_dim) product per KV head (a broadcast matmul would copy the weights)
    up = v_up_weight.view(num_kv_heads, head_dim, v_rank).transpose(1, 2)
    per_head = aggregated.view(batch, num_kv_heads, groups, v_rank).transpose(0, 1).reshape(num_kv_heads, -1, v_rank)
    out = torch.bmm(per_head, up).view(num_kv_heads, batch, groups, head_dim).transpose(0, 1)
    if v_bias is not None:
        out = out + v_bias.view(num_kv_heads, 1, head_dim)
    return out.reshape(batch, num_heads, head_dim)


__all__ = ["latent_decode_attention", "latent_decode_reference", "rope_cos_sin", "rope_tables", "use_decode_kernel"]
