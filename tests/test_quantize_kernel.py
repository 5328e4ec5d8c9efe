"""The Triton quantizer of new latents against `LatentCodec.encode`, byte for byte (under TRITON_INTERPRET=1 on CPU,
natively on a GPU, where torch's own encode is the reference on the same device)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from starkv_convert.remote_code import import_remote  # noqa: E402

kernels = import_remote("latent_quantize")
quant = import_remote("latent_quant")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no dots here: the interpreter runs bf16 too


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """The rows start as 0xAB bytes, so a byte the kernel forgets to write shows up."""
    monkeypatch.setattr(
        kernels, "_alloc", lambda *shape, device: torch.full(shape, 0xAB, dtype=torch.uint8, device=device)
    )


def check(z: torch.Tensor, codec) -> None:
    got = kernels.quantize_rows(z, codec)
    expected = codec.encode(z)
    assert got.dtype == torch.uint8 and got.shape == expected.shape == (*z.shape[:-1], codec.bytes_per_token)
    assert torch.equal(got, expected), f"{(got != expected).sum()} of {got.numel()} bytes differ"


def latents(shape: tuple[int, ...], ranks: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random latents, leading channels of each block larger; tokens of very different sizes, some all zero."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.cat([torch.logspace(1, -2, r) for r in ranks])
    z = torch.randn(*shape, sum(ranks), generator=g) * spread
    size = torch.tensor([1.0, 0.0, 1e-7, 1e-3, 1e3, 0.1, 1.0])  # 1e-7: scales clamped to fp16's tiny
    z = z * size[torch.arange(z[..., 0].numel()) % len(size)].view(*shape, 1)
    z[(0,) * (len(shape) - 1) + (-1,)][: ranks[0]] = 0  # a token with one all-zero block
    return z.to(dtype).to(DEVICE)


CASES = [  # token shape, ranks, 8-bit channels per block, group
    ((2, 37), [13, 38, 5, 70], [0, 10, 5, 33], 16),  # n8 = 0 and n8 = rank; odd 4-bit parts; groups not dividing
    ((1,), [45, 7], [45, 0], 32),  # one token; an odd 8-bit-only block, an odd 4-bit-only one
    ((75,), [19, 24, 1], [3, 17, 0], 8),  # 70+ tokens in one axis; rank 1
    ((3, 2), [0, 29, 12], [0, 13, 12], 6),  # a group that is no power of two; an empty block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, ranks, n8, group", CASES)
def test_rows_equal_the_codecs(dtype, shape, ranks, n8, group):
    codec = quant.LatentCodec(ranks, n8, group)
    check(latents(shape, ranks, dtype, seed=len(ranks)), codec)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_ties(dtype):
    """
    Groups whose scale is exactly s (peak 127 s or 7 s) and whose other values are (k + 1/2) s: every code is a tie
    (rounded to even). In fp32 also scales halfway between two fp16 values (rounded to even as well).
    """
    ranks, n8, group = [40, 21], [24, 9], 8
    codec = quant.LatentCodec(ranks, n8, group)
    qmax = torch.cat([torch.tensor([127.0] * a + [7.0] * (r - a)) for r, a in zip(ranks, n8)])
    firsts = [  # each group's first channel: groups count from the start of each part of each block
        sum(ranks[:j]) + start + i
        for j, (r, a) in enumerate(zip(ranks, n8))
        for start, size in ((0, a), (a, r - a))
        for i in range(0, size, group)
    ]
    g = torch.Generator().manual_seed(0)
    tokens = 6
    mantissa = torch.tensor([1.0] if dtype == torch.bfloat16 else [1.0, 3.0, 5.0])  # s exact in the input's dtype
    s = mantissa[torch.randint(len(mantissa), (tokens, 1), generator=g)] * 2.0 ** torch.randint(-8, 3, (tokens, 1))
    k = torch.floor(torch.rand(tokens, sum(ranks), generator=g) * 2 * qmax) - qmax  # in [-qmax, qmax - 1]
    z = (k + 0.5) * s
    z[:, firsts] = qmax[firsts] * s * torch.sign(torch.randn(tokens, 1, generator=g))  # each group's peak
    if dtype == torch.float32:  # peaks whose scale lies halfway between fp16 neighbours (exact in fp32)
        half_ulp = 2.0 ** (torch.floor(torch.log2(s)) - 11)
        z[-2:, firsts] = qmax[firsts] * (s[-2:] + half_ulp[-2:])
    check(z.to(dtype).to(DEVICE), codec)


def test_batch_dims_strides_and_no_tokens():
    codec = quant.LatentCodec([30, 9], [12, 4], 16)
    z = latents((3, 5), [30, 9], torch.float32, seed=1)
    check(z.transpose(0, 1), codec)  # not contiguous
    check(torch.randn(39, 4, device=DEVICE).T, codec)  # channels not contiguous
    empty = kernels.quantize_rows(torch.zeros(2, 0, 39, device=DEVICE), codec)  # (encode fails on no tokens)
    assert empty.shape == (2, 0, codec.bytes_per_token) and empty.dtype == torch.uint8


def test_odd_groups_take_the_codec():
    codec = quant.LatentCodec([10, 7], [3, 0], 5)
    check(latents((4,), [10, 7], torch.float32, seed=2), codec)


def test_switch(monkeypatch):
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "torch")
    assert not kernels.use_quantize_kernel(torch.device(DEVICE))
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "triton")
    assert kernels.use_quantize_kernel(torch.device("cpu"))
    monkeypatch.delenv("STARKV_DECODE_KERNEL")
    assert kernels.use_quantize_kernel(torch.device(DEVICE)) == (DEVICE == "cuda")


@pytest.mark.parametrize("ranks, n8, align", [([38, 37], [8, 37], 4), ([13, 38, 5], [0, 10, 5], 1), ([32], [0], 16)])
def test_accesses_stay_inside_latents_and_rows(guards, monkeypatch, ranks, n8, align):
    """The latents read and the rows written sit between guard zones that no load or store touches."""
    codec = quant.LatentCodec(ranks, n8, 32, align)
    z = guards(latents((3, 17), ranks, torch.float32, seed=5), "latents")
    monkeypatch.setattr(kernels, "_alloc", lambda *shape, device: guards(torch.zeros(shape, dtype=torch.uint8), "rows"))
    check(z, codec)
    assert len(guards.zones) == 4 and not guards.hits, guards.hits[:8]
