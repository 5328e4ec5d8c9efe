"""The Triton decode kernel against its PyTorch reference (under TRITON_INTERPRET=1 on CPU, natively on a GPU)."""

import importlib
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from starkv_convert.remote_code import import_remote  # noqa: E402

kernels = import_remote("latent_decode")
latent_quant = import_remote("latent_quant")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim, dtype=torch.float64) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x32.to(self.weight.dtype)).to(x.dtype)


def make_case(
    batch,
    tokens,
    num_kv_heads,
    groups,
    head_dim,
    k_ranks,
    v_rank,
    *,
    pad=0,
    bias=False,
    norm=False,
    rope_scale=1.0,
    seed=0,
):
    """Random inputs in float64; the first `pad` tokens of sequence 0 are left padding."""
    g = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * groups
    f64 = dict(dtype=torch.float64, generator=g)
    case = dict(
        query=torch.randn(batch, num_heads, head_dim, **f64),
        key_latents=torch.randn(batch, tokens, sum(k_ranks), **f64),
        value_latents=torch.randn(batch, tokens, v_rank, **f64),
        positions=torch.arange(tokens).expand(batch, -1).clone(),
        valid=None,
        k_up_weight=torch.randn(head_dim, sum(k_ranks), **f64) / max(k_ranks) ** 0.5,
        k_ranks=list(k_ranks),
        k_bias=torch.randn(num_kv_heads * head_dim, **f64) if bias else None,
        k_norm=RMSNorm(head_dim) if norm else None,
        inv_freq=1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)),
        rope_scale=rope_scale,
        v_up_weight=torch.randn(num_kv_heads * head_dim, v_rank, **f64) / v_rank**0.5,
        v_bias=torch.randn(num_kv_heads * head_dim, **f64) if bias else None,
        scaling=head_dim**-0.5,
    )
    if pad:
        valid = torch.ones(batch, tokens, dtype=torch.bool)
        valid[0, :pad] = False
        case["valid"] = valid
        case["positions"][0] = (torch.arange(tokens) - pad).clamp_min(1)  # what generate() gives padding
    return case


def cast(case, dtype):
    out = {}
    for name, value in case.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name != "inv_freq":
            value = value.to(dtype)
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE)
        if isinstance(value, torch.nn.Module):
            value = RMSNorm(value.weight.shape[0]).to(DEVICE)
            value.weight.data = case["k_norm"].weight.data.to(dtype).to(DEVICE)
        out[name] = value
    return out


@pytest.fixture
def poisoned(monkeypatch):
    """Every scratch buffer starts as NaN, so an element the kernels forget to write shows up."""
    monkeypatch.setattr(
        kernels,
        "_alloc",
        lambda *shape, device, dtype=torch.float32: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def check(case, dtype, config=None):
    expected = kernels.latent_decode_reference(**cast(case, torch.float64)).cpu()
    got = kernels.latent_decode_attention(**cast(case, dtype), config=config).cpu().double()
    assert got.shape == expected.shape
    assert not torch.isnan(got).any()
    error = (got - expected).norm() / expected.norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if DEVICE == "cuda" else []
)  # no bf16 dot in the interpreter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, tokens, kv_heads, groups, head_dim, k_ranks, v_rank",
    [
        (2, 77, 2, 4, 64, [13, 38], 45),  # GQA, ragged ranks not multiples of 16, context not a block multiple
        (1, 200, 3, 3, 64, [7, 21, 64], 96),  # SmolLM2-like G=3, a full-rank head
        (3, 33, 4, 1, 128, [38, 17, 5, 40], 130),  # MHA, head_dim 128
        (1, 5, 1, 8, 64, [1], 1),  # rank 1, G=8, fewer tokens than a block
    ],
)
def test_kernel_matches_reference(poisoned, dtype, batch, tokens, kv_heads, groups, head_dim, k_ranks, v_rank):
    check(make_case(batch, tokens, kv_heads, groups, head_dim, k_ranks, v_rank), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [None, {"rope_table": True, "block_tokens": 32}, {"rope_table": True, "half_scores": False}],
)  # angle addition; tables; tables with an fp32 scores buffer (fp16 inputs: fp16 by default, as G = 2)
def test_left_padding_bias_norm_and_scaled_rope(poisoned, dtype, config):
    case = make_case(2, 90, 2, 2, 64, [20, 31], 50, pad=37, bias=True, norm=True, rope_scale=1.3, seed=3)
    check(case, dtype, config)
    # padding really is ignored: changing padded latents changes nothing
    other = dict(case, key_latents=case["key_latents"].clone(), value_latents=case["value_latents"].clone())
    other["key_latents"][0, :37] = 1e3
    other["value_latents"][0, :37] = -1e3
    a = kernels.latent_decode_attention(**cast(case, torch.float32))
    b = kernels.latent_decode_attention(**cast(other, torch.float32))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"scores_splits": 3, "values_splits": 5, "block_tokens": 16},  # the last splits run past the last tile
        {"token_major_scores": True, "heads_per_program": 2, "block_tokens": 32},
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forced_splits_and_other_layouts(poisoned, config, dtype):
    """
    Splits set by hand and the other scores layouts (fp32 and, for 16-bit inputs, fp16 scores buffers): every padded
    score written before it is read (NaN poison).
    """
    check(make_case(2, 101, 2, 2, 64, [20, 31], 50, pad=9, seed=5), dtype, config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_context_with_large_positions(poisoned, dtype):
    """Positions far beyond the context (as after long generation): RoPE angles of thousands of radians."""
    case = make_case(1, 300, 1, 4, 64, [24], 40, seed=5)
    case["positions"] = case["positions"] + 30_000
    check(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_that_are_not_consecutive(poisoned, dtype):
    """Packed or custom positions: tiles whose positions are not consecutive take the exact RoPE path."""
    case = make_case(2, 150, 2, 2, 64, [16, 30], 33, seed=7)
    g = torch.Generator().manual_seed(8)
    case["positions"] = torch.randint(0, 5000, (2, 150), generator=g)
    case["positions"][1, :70] = torch.arange(70) + 900  # one sequence partly consecutive
    check(case, dtype)


PATHS = {  # launch settings that select each variant of the kernels
    "BT 16, few splits": {"block_tokens": 16, "values_programs_per_sm": 1},
    "pow2 ranks, unaligned, BT 16": {"rank_pad": 0, "aligned_latents": False, "block_tokens": 16},
    "4 heads/program": {"heads_per_program": 4},
    "4 heads/program, tables, aligned": {"heads_per_program": 4, "rope_table": True, "aligned_latents": True},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "groups, k_ranks, v_rank, extras",
    [
        (1, [5, 38, 21], 70, {}),  # MHA; key rows of 64 columns, so 8-aligned windows over unaligned head offsets
        (2, [13, 19], 33, {"pad": 11, "bias": True}),
        (3, [7, 33, 40, 16], 96, {"norm": True, "rope_scale": 1.3}),
        (8, [38], 17, {"pad": 40, "bias": True, "norm": True}),
    ],
)
def test_every_kernel_path(poisoned, dtype, path, groups, k_ranks, v_rank, extras):
    """Each launch variant; odd contexts, ragged ranks, G = 1..8."""
    case = make_case(2, 101, len(k_ranks), groups, 64, k_ranks, v_rank, seed=groups, **extras)
    check(case, dtype, PATHS[path])


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_splits(poisoned, dtype):
    """More context splits than the merge combines in one step (16), with left padding that empties whole splits."""
    config = {"block_tokens": 16, "values_programs_per_sm": 64, "values_fewer_splits": (0, 1)}
    splits, _ = kernels._splits(-(-700 // 16), 2 * 3, torch.device(DEVICE), 64)  # 3 value blocks of 32 columns
    assert splits > 16 or DEVICE == "cuda"
    check(make_case(2, 700, 2, 3, 64, [9, 30], 70, pad=300, seed=12), dtype, config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_value_rank(poisoned, dtype):
    """From value rank 1024 the values pass and the merge take blocks of 128 columns (MHA 7B keeps 2048)."""
    check(make_case(1, 70, 2, 2, 64, [9, 30], 1030, seed=11), dtype)


def test_scores_buffer_is_half_for_16_bit_gqa(monkeypatch):
    """The scores buffer (the first scratch buffer) is fp16 for 16-bit inputs with G >= 2, else fp32."""
    made = []

    def alloc(*shape, device, dtype=torch.float32):
        made.append(dtype)
        return torch.empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_alloc", alloc)
    for groups, dtype, config, expected in [
        (2, torch.float16, None, torch.float16),
        (1, torch.float16, None, torch.float32),  # MHA: measured slower with fp16 scores at batch 16
        (2, torch.float32, None, torch.float32),
        (2, torch.float16, {"half_scores": False}, torch.float32),
        *([(2, torch.bfloat16, None, torch.float16)] if DEVICE == "cuda" else []),  # fp16, not bf16: finer steps
    ]:
        made.clear()
        kernels.latent_decode_attention(**cast(make_case(1, 20, 2, groups, 64, [9, 30], 40), dtype), config=config)
        assert made[0] == expected, (groups, dtype, config)


def rotated_keys(case) -> torch.Tensor:
    """The case's keys as the reference rebuilds and rotates them: (batch, kv_heads, tokens, head_dim), float64."""
    cos, sin = kernels.rope_cos_sin(case["positions"], case["inv_freq"], 1.0, torch.float64)
    keys = kernels.rebuild_keys(case["key_latents"], case["k_up_weight"], case["k_ranks"], None, None)
    return kernels.apply_rope(keys, cos[:, None], sin[:, None])


def test_scores_past_the_half_range_saturate(poisoned):
    """
    One token scoring past fp16's range (66,000) with fp16 inputs: the fp16 scores buffer holds it at its finite limit,
    so the softmax stays one-hot on that token (no inf - inf = NaN) and the output is the reference's.
    """
    case = make_case(1, 70, 2, 2, 64, [9, 30], 40, seed=13)
    keys = rotated_keys(case)[0]  # (kv_heads, tokens, head_dim)
    target = keys[:, 41].repeat_interleave(2, dim=0)  # each query head along its KV head's key of token 41
    case["query"] = (target * 66_000 / case["scaling"] / (target * target).sum(-1, keepdim=True))[None]
    scores = torch.einsum("hd,htd->ht", case["query"][0], keys.repeat_interleave(2, dim=0)) * case["scaling"]
    assert scores[:, 41].min() > 65_504 and scores.abs().max() == scores[:, 41].max()
    assert (scores[:, 41:42] - scores).topk(2, dim=1, largest=False).values[:, 1].min() > 1000  # one-hot softmax
    check(case, torch.float16)


def test_scores_below_the_half_range_saturate(poisoned):
    """A one-token context scoring -66,000: saturated, not -inf, so the softmax still gives that token weight 1."""
    case = make_case(1, 1, 1, 2, 64, [30], 40, seed=14)
    key = rotated_keys(case)[0, :, 0].expand(2, -1)  # (query heads, head_dim)
    case["query"] = (key * -66_000 / case["scaling"] / (key * key).sum(-1, keepdim=True))[None]
    check(case, torch.float16)


@pytest.mark.parametrize("half", [False, True])
def test_nan_in_the_cache_shows_in_the_output(half):
    """A NaN key latent makes the output NaN, as in the reference: the fp16 scores buffer must not hide it."""
    case = make_case(1, 70, 2, 2, 64, [9, 30], 40, seed=13)
    case["key_latents"][0, 41] = float("nan")
    assert torch.isnan(kernels.latent_decode_reference(**cast(case, torch.float64))).any()
    got = kernels.latent_decode_attention(**cast(case, torch.float16), config={"half_scores": half})
    assert torch.isnan(got).any()


QUANT_CASES = [  # groups, k_ranks, k_n8 per head, v_rank, v_n8, group, extras
    (4, [13, 38], [0, 10], 45, 12, 32, {}),  # a 4-bit-only head; 4-bit parts of odd size
    (1, [5, 38, 21], [5, 0, 7], 70, 0, 32, {"pad": 11, "bias": True}),  # an 8-bit-only head, 4-bit values
    (3, [7, 33, 40, 16], [3, 33, 0, 9], 96, 96, 16, {"norm": True, "rope_scale": 1.3}),  # groups of 16
    (2, [38, 19], [38, 1], 1030, 301, 32, {"pad": 40}),  # wide value rank: blocks of 128 columns
    (4, [64, 9], [10, 9], 64, 33, 32, {"bias": True}),  # a head of three scale groups (8-bit, then 32 + 22 4-bit)
    # rows read in whole words (codes at multiples of 4 bytes): 4 bits only; 8 bits only; mixed, n8 multiples of 4
    (4, [32, 32], [0, 0], 64, 0, 32, {}),
    (2, [32, 16], [32, 16], 64, 64, 32, {"bias": True}),
    (4, [38, 40], [8, 16], 96, 32, 32, {"pad": 5}),
    (4, [38, 37], [8, 37], 64, 0, 32, {}),  # beside them a head of 8 bits only, of odd rank
    # rows aligned to 8 and 16 bytes; rows inside a larger cache (a slice: 2-byte aligned offset and row stride)
    (2, [40, 24], [8, 0], 72, 8, 32, {"align": 8}),
    (4, [48, 32], [16, 32], 128, 32, 32, {"align": 16, "bias": True}),
    (4, [38, 40], [8, 16], 96, 32, 32, {"pad": 3, "embedded": True}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, k_ranks, k_n8, v_rank, v_n8, group, extras", QUANT_CASES)
def test_quantized_latents(poisoned, dtype, groups, k_ranks, k_n8, v_rank, v_n8, group, extras):
    """
    The kernel reads the codecs' uint8 rows and dequantizes on the fly: equal to the reference on decoded rows.
    Values are dequantized per scale group (groups of 32), or per value (groups of 16).
    """
    check_quantized(dtype, groups, k_ranks, k_n8, v_rank, v_n8, group, extras)


def _embedded(rows: torch.Tensor) -> torch.Tensor:
    """`rows` as a slice of a larger cache: 3 tokens and 2 bytes in, rows 6 bytes longer (the kernel's ALIGN is 2)."""
    batch, tokens, length = rows.shape
    cache = torch.zeros(batch, tokens + 3, length + 6, dtype=torch.uint8, device=rows.device)
    view = cache[:, 3:, 2 : 2 + length]
    view.copy_(rows)
    assert (
        view.storage_offset() > 0 and kernels._codec_flags(latent_quant.LatentCodec([8], [0], 32), view)["ALIGN"] == 2
    )
    return view


GUARDED_CASES = [case for case in QUANT_CASES if not case[-1].get("embedded")] + [
    (4, [32, 32], [32, 0], 64, 64, 32, {}),  # a head of 8 bits only beside a 4-bit one, 8-bit values
    (4, [32, 32], [16, 16], 64, 4, 32, {}),  # fewer 8-bit channels than half a group
]


@pytest.mark.parametrize("groups, k_ranks, k_n8, v_rank, v_n8, group, extras", GUARDED_CASES)
@pytest.mark.parametrize("config", [None, {"key_scale_words": True, "value_scale_words": True}])
def test_quantized_reads_stay_inside_the_rows(guards, groups, k_ranks, k_n8, v_rank, v_n8, group, extras, config):
    """No active lane of the kernel's loads touches the 64 bytes before or after the rows: masks must switch off
    lanes that point outside, not only discard what they read (every quantized case: grouped and per-value reads;
    key and value scales read as 4-byte words)."""
    check_quantized(torch.float32, groups, k_ranks, k_n8, v_rank, v_n8, group, extras, config=config, place=guards)
    assert len(guards.zones) == 4 and not guards.hits, guards.hits[:8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k_ranks, v_rank", [([38, 42], 64), ([5, 38, 21], 45), ([64, 9], 1030)])
def test_accesses_stay_inside_every_tensor(guards, dtype, k_ranks, v_rank):
    """Every input of the decode kernel (16-byte aligned key windows where rows allow, RoPE tables in 16 bits, wide
    value blocks) sits between guard zones that no load or store touches."""
    case = cast(make_case(2, 101, len(k_ranks), 2, 64, k_ranks, v_rank, pad=3, bias=True, seed=3), dtype)
    names = ("query", "key_latents", "value_latents", "positions", "k_up_weight", "v_up_weight", "k_bias")
    case.update({name: guards(case[name], name) for name in names})
    tables = None
    if dtype != torch.float32:
        rope = kernels.rope_tables(case["positions"], case["inv_freq"], 1.0, dtype)
        tables = tuple(guards(t, f"table {i}") for i, t in enumerate(rope))
    got = kernels.latent_decode_attention(**case, tables=tables)
    assert len(guards.zones) == 2 * (len(names) + (tables is not None) * 2) and not guards.hits, guards.hits[:8]
    expected = kernels.latent_decode_reference(**cast(case, torch.float64))
    assert (got.double() - expected).norm() / expected.norm() < TOLERANCE[dtype]


def record_launches(monkeypatch, name, module=kernels):
    """The compile-time settings of every launch of kernel `name` of `module` (the kernel still runs)."""
    launches = []
    kernel = getattr(module, name)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Recorder())
    return launches


@pytest.fixture
def scores_launches(monkeypatch):
    return record_launches(monkeypatch, "_scores_kernel")


@pytest.fixture
def values_launches(monkeypatch):
    return record_launches(monkeypatch, "_values_kernel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", [False, True])
@pytest.mark.parametrize(
    "k_ranks, head_dim, norm",
    [([13, 38], 64, False), ([7, 21, 64], 64, True), ([38, 17, 5, 40], 128, False)],
)  # rank chunks 32 + 16, one chunk of 64 (and k-norm), 32 + 16 at head_dim 128
@pytest.mark.parametrize("joined, rank_pad", [(True, 16), (True, 0), (False, 16)])  # (rank_pad 0: one chunk)
def test_rope_halves(poisoned, scores_launches, dtype, tables, k_ranks, head_dim, norm, joined, rank_pad):
    """Keys rebuilt by one product of both RoPE halves and scored by one product over the head dimension (the
    default), or each half by its own products."""
    case = make_case(2, 77, len(k_ranks), 2, head_dim, k_ranks, 45, pad=5, bias=True, norm=norm, seed=11)
    check(case, dtype, {"joined_halves": joined, "rope_table": tables, "rank_pad": rank_pad})
    assert [launch["JOINED"] for launch in scores_launches] == [joined]


HALF_DTYPES = [d for d in DTYPES if d != torch.float32]


def nan_beyond(x, extra_tokens, extra_columns):
    """`x` (batch, tokens, columns) as a view into a larger buffer whose other elements are NaN."""
    batch, tokens, columns = x.shape
    wider = torch.full((batch, tokens + extra_tokens, columns + extra_columns), float("nan"), dtype=x.dtype)
    wider = wider.to(x.device)
    wider[:, :tokens, :columns] = x
    return wider[:, :tokens, :columns]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "batch, tokens, groups, head_dim, k_ranks, v_rank, rank_pad, norm",
    [
        (2, 77, 2, 64, [13, 43], 40, 16, False),  # rank chunks 32 + 16 (56-column rows), G = 2, 32-column value blocks
        (3, 130, 1, 128, [38, 17, 5, 36], 136, 16, True),  # MHA, head_dim 128, k-norm, three tiles, fp32 scores
        (1, 9, 4, 64, [30, 10], 8, 0, False),  # one 64-column chunk past the row's end, fewer tokens than a tile
    ],
)
def test_tma_loads(
    poisoned, scores_launches, values_launches, dtype, batch, tokens, groups, head_dim, k_ranks, v_rank, rank_pad, norm
):
    """Both passes reading by TMA descriptors (latents, RoPE tables, scores) equal the reference, with the latents
    and tables views of larger NaN-filled buffers (rows 8 columns longer, 40 more tokens): NaN in the output would
    show a read outside the descriptors' bounds."""
    case = make_case(batch, tokens, len(k_ranks), groups, head_dim, k_ranks, v_rank, pad=3, bias=True, norm=norm)
    expected = kernels.latent_decode_reference(**cast(case, torch.float64)).cpu()
    inputs = cast(case, dtype)
    inputs["key_latents"] = nan_beyond(inputs["key_latents"], 40, 8)
    inputs["value_latents"] = nan_beyond(inputs["value_latents"], 40, 8)
    tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, dtype)
    tables = tuple(nan_beyond(t, 40, 0) for t in tables)
    config = {"scores_tma": True, "values_tma": True, "rank_pad": rank_pad}
    got = kernels.latent_decode_attention(**inputs, tables=tables, config=config).cpu().double()
    assert [launch["TMA"] for launch in scores_launches + values_launches] == [True, True]
    assert not torch.isnan(got).any()
    assert (got - expected).norm() / expected.norm() < TOLERANCE[dtype]
    pointers = {"scores_tma": False, "values_tma": False, "rank_pad": rank_pad}
    plain = kernels.latent_decode_attention(**inputs, tables=tables, config=pointers).cpu().double()
    assert [launch["TMA"] for launch in (scores_launches[1], values_launches[1])] == [False, False]
    assert (got - plain).abs().max() <= 1e-3 * plain.abs().max()


FOLD_CASES = [  # batch, tokens, KV heads, head_dim, k_ranks, v_rank, pad, rope_scale
    (3, 130, 4, 128, [38, 17, 5, 36], 130, 5, 1.0),  # rank chunks 32 + 16, three tiles, left padding
    (2, 77, 2, 64, [13, 43], 40, 3, 1.3),  # 32 + 16 at head_dim 64, attention scaling in the tables
    (2, 70, 3, 64, [13, 38, 9], 40, 0, 1.0),  # rows of 60 columns: unaligned latents (pointer loads only)
    (1, 9, 2, 64, [30, 10], 8, 0, 1.0),  # one 64-column chunk past the row's end, fewer tokens than a tile
]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("batch, tokens, kv_heads, head_dim, k_ranks, v_rank, pad, rope_scale", FOLD_CASES)
def test_folded_scores(
    poisoned, scores_launches, dtype, tma, batch, tokens, kv_heads, head_dim, k_ranks, v_rank, pad, rope_scale
):
    """G = 1 with RoPE tables, forced on for 16-bit latents (by default only quantized ones fold): the query folded
    into the up-projection and the tables times that (keys never rebuilt) equal the reference and the unfolded pass;
    by TMA, with the latents and tables views of larger NaN-filled buffers (NaN in the output would show a read
    outside them)."""
    case = make_case(batch, tokens, kv_heads, 1, head_dim, k_ranks, v_rank, pad=pad, rope_scale=rope_scale, seed=5)
    expected = kernels.latent_decode_reference(**cast(case, torch.float64)).cpu()
    inputs = cast(case, dtype)
    tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], rope_scale, dtype)
    if tma:
        inputs["key_latents"] = nan_beyond(inputs["key_latents"], 40, 8)
        tables = tuple(nan_beyond(t, 40, 0) for t in tables)
    results = [
        kernels.latent_decode_attention(**inputs, tables=tables, config={"scores_tma": tma, "folded_scores": fold})
        for fold in (True, False)
    ]
    aligned = sum(k_ranks) % 8 == 0
    assert [(launch["FOLD"], launch["TMA"]) for launch in scores_launches] == [
        (True, tma and aligned),
        (False, tma and aligned),
    ]
    folded, unfolded = (r.cpu().double() for r in results)
    for got in (folded, unfolded):
        assert not torch.isnan(got).any()
        assert (got - expected).norm() / expected.norm() < TOLERANCE[dtype]
    assert (folded - unfolded).norm() / unfolded.norm() < TOLERANCE[dtype] / 2


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("paired", [False, True])
def test_folded_scores_heads_a_program(poisoned, scores_launches, dtype, quantized, heads, paired):
    """The folded pass with two or four KV heads a program (each tile's tables read once for all of them) equals the
    reference, for 16-bit latents (rank chunks 32 + 16, left padding) and quantized keys (mixed 8/4-bit heads), each
    head's products apart or two heads' as one (`paired_heads`: both heads' columns of a rank chunk or scale group
    side by side)."""
    config = {"folded_scores": True, "heads_per_program": heads, "rope_table": True, "paired_heads": paired}
    if quantized:
        check_quantized(dtype, 1, [38, 40, 32, 9], [8, 16, 0, 9], 96, 32, 32, {"pad": 5}, config=config)
    else:
        case = make_case(3, 130, 4, 1, 128, [38, 17, 5, 36], 130, pad=5, seed=5)
        check(case, dtype, config)
    assert [(launch["FOLD"], launch["HPP"], launch["PAIRED"]) for launch in scores_launches] == [(True, heads, paired)]


@pytest.mark.parametrize(
    "heads, k_ranks, k_n8",
    [
        (2, [64, 9], [10, 9]),  # three scale groups (8-bit, then 32 + 22 4-bit) beside an 8-bit head of one
        (2, [32, 32, 32, 32], [0, 0, 0, 0]),  # 4 bits, one group a head (decode_attention's 4-bit MHA rows)
        (4, [38, 40, 32, 9], [8, 16, 0, 9]),  # two pairs of heads, mixed 8/4-bit groups
    ],
)
def test_folded_scores_paired_heads(poisoned, scores_launches, heads, k_ranks, k_n8):
    """Quantized keys, folded, with two heads' products of a tile as one (`joined_groups` and `paired_heads`: each
    scale group's columns of both heads side by side) equal the reference, left-padded."""
    config = {
        "folded_scores": True,
        "heads_per_program": heads,
        "joined_groups": True,
        "paired_heads": True,
        "rope_table": True,
    }
    check_quantized(torch.float16, 1, k_ranks, k_n8, 64, 33, 32, {"pad": 5}, config=config)
    assert [(launch["FOLD"], launch["HPP"], launch["PAIRED"]) for launch in scores_launches] == [(True, heads, True)]


@pytest.mark.parametrize("query_scale, weight_scale", [(100.0, 1e4), (0.0, 1.0)])
def test_folded_weights_are_scaled_into_half_range(poisoned, scores_launches, query_scale, weight_scale):
    """The folded weights are scaled so that the largest is 2^14 before they become fp16: weights of ~1e5 (queries
    of 100, up-projections of 1e4) would overflow unscaled, and an all-zero query (no scale to take) must give
    uniform attention, not NaN."""
    case = make_case(2, 70, 2, 1, 64, [13, 38], 24, seed=9)
    case["query"] = case["query"] * query_scale
    case["k_up_weight"] = case["k_up_weight"] * weight_scale
    expected = kernels.latent_decode_reference(**cast(case, torch.float64)).cpu()
    inputs = cast(case, torch.float16)
    tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, torch.float16)
    got = kernels.latent_decode_attention(**inputs, tables=tables, config={"folded_scores": True}).cpu().double()
    assert [launch["FOLD"] for launch in scores_launches] == [True]
    assert not torch.isnan(got).any()
    assert (got - expected).norm() / expected.norm() < TOLERANCE[torch.float16]


def test_folded_scores_only_where_they_apply(scores_launches):
    """Folding needs one query head per KV head, RoPE tables (16-bit inputs) and no key bias or k-norm; by default
    ("auto") it is taken for quantized latents only (for 16-bit ones it was slower on the H100)."""
    on = {"folded_scores": True}
    cases = [  # (make_case's G and extras, dtype, with tables, settings), whether it folds
        ((1, {}), torch.float16, True, None, False),
        ((1, {}), torch.float16, True, on, True),
        ((2, {}), torch.float16, True, on, False),
        ((1, {"bias": True}), torch.float16, True, on, False),
        ((1, {"norm": True}), torch.float16, True, on, False),
        ((1, {}), torch.float16, False, on, False),
        ((1, {}), torch.float32, True, on, False),
        ((1, {}), torch.float16, True, {"folded_scores": True, "heads_per_program": 2}, True),
        ((1, {}), torch.float16, True, {"folded_scores": True, "heads_per_program": 4}, True),
    ]
    for (groups, extras), dtype, with_tables, config, _ in cases:
        inputs = cast(make_case(1, 20, 4, groups, 64, [13, 38, 9, 30], 20, **extras), dtype)
        tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, dtype) if with_tables else None
        kernels.latent_decode_attention(**inputs, tables=tables, config=config)
    assert [launch["FOLD"] for launch in scores_launches] == [case[-1] for case in cases]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "k_ranks, k_n8, v_rank, v_n8, extras",
    [
        ([38, 40], [8, 16], 96, 32, {"pad": 5}),  # mixed 8/4-bit heads: two scale groups each
        ([32, 32], [0, 0], 64, 0, {"align": 16}),  # 4 bits only, one group a head (decode_attention's 4-bit rows)
        ([64, 9], [10, 9], 64, 33, {}),  # a head of three groups (8-bit, then 32 + 22 4-bit) beside an 8-bit one
    ],
)
@pytest.mark.parametrize("joined", [True, False])
def test_folded_scores_of_quantized_keys(scores_launches, dtype, k_ranks, k_n8, v_rank, v_n8, extras, joined):
    """Quantized keys (G = 1, read per scale group) fold too: per group, the codes times their channel weights,
    times the token's scale, equal the reference on the decoded rows; with a group's even and odd channels in one
    product (`joined_groups`) or in two."""
    config = {"rope_table": True, "joined_groups": joined}
    check_quantized(dtype, 1, k_ranks, k_n8, v_rank, v_n8, 32, extras, config=config)
    assert [(launch["FOLD"], launch["JOINED"]) for launch in scores_launches] == [(True, joined)]


def test_tma_loads_only_where_aligned(scores_launches, values_launches):
    """Rows not 16-byte aligned, or fp32 inputs (scores pass: no RoPE tables), keep the pointer loads."""
    config = {"scores_tma": True, "values_tma": True, "rope_table": True}
    for ranks, v_rank, dtype in (([13, 38], 20, torch.float16), ([13, 43], 16, torch.float32)):
        inputs = cast(make_case(1, 20, 2, 2, 64, ranks, v_rank), dtype)
        kernels.latent_decode_attention(**inputs, config=config)
    assert [launch["TMA"] for launch in scores_launches] == [False, False]
    assert [launch["TMA"] for launch in values_launches] == [False, True]


def test_tma_by_default_only_where_its_host_time_is_hidden(monkeypatch):
    """On CUDA, `scores_tma` "auto" takes TMA while a CUDA graph is captured or for key latents of 256 MB or more
    (eager calls below that were host-bound and slower with it on the H100); the interpreter always takes it."""
    cuda = torch.device("cuda")
    small, large = kernels.TMA_AUTO_BYTES - 2, kernels.TMA_AUTO_BYTES
    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda capturing=capturing: capturing)
        assert [kernels._tma_pays(cuda, x) for x in (small, large)] == [capturing, True]
    assert kernels._tma_pays(torch.device("cpu"), small)


def test_tma_is_the_default_except_under_torch_compile(monkeypatch, scores_launches):
    """Aligned 16-bit latents with tables take TMA by default; under torch.compile (not yet checked on a GPU) they
    keep the pointer loads, and give the same result."""
    inputs = cast(make_case(2, 70, 2, 2, 64, [13, 43], 16, seed=3), torch.float16)
    tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, torch.float16)
    with_tma = kernels.latent_decode_attention(**inputs, tables=tables)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    without = kernels.latent_decode_attention(**inputs, tables=tables)
    assert [launch["TMA"] for launch in scores_launches] == [True, False]
    assert torch.equal(with_tma, without)


@pytest.mark.parametrize(
    "tiles, programs, splits",
    [(1024, 8, 49), (256, 32, 12), (1024, 32, 24), (256, 64, 12), (256, 8, 32), (512, 128, 9), (512, 512, 3)],
)  # the H100's decode_attention rows: GQA B1 64K, MHA B1 16K / 64K, GQA B8, GQA B1 16K, GQA / MHA B16
def test_splits_fill_whole_waves(monkeypatch, tiles, programs, splits):
    """With 3 programs resident per multiprocessor, the scores pass takes the split count between half the plain
    choice and the plain choice whose programs fill their last wave best (on 132 multiprocessors)."""
    monkeypatch.setitem(kernels._DEVICES, "cuda", (132, 9))
    cuda = torch.device("cuda")
    plain, _ = kernels._splits(tiles, programs, cuda, 8, 2, 16)
    got, per_split = kernels._splits(tiles, programs, cuda, 8, 2, 16, resident=3)
    assert got == splits and -(-plain // 2) <= got <= plain and got * per_split >= tiles > (got - 1) * per_split
    assert kernels._wave_fill(got * programs, 396) >= kernels._wave_fill(plain * programs, 396)


def test_rope_tables_hold_the_model_dtype_rounding_in_fp16():
    """16-bit tables are fp16 holding exactly what transformers' bf16 cos/sin hold (to 2^-25 below 2^-14)."""
    positions = torch.tensor([[0, 1, 2, 7, 1000, 131071]], dtype=torch.int32)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    inv_freq[-8:] /= 8  # Llama-3-scaled low frequencies: angles down to ~2e-7
    for scale in (1.0, 1.3):
        cos, sin = kernels.rope_tables(positions, inv_freq, scale, torch.bfloat16)
        assert cos.dtype == sin.dtype == torch.float16
        ref_cos, ref_sin = kernels.rope_cos_sin(positions, inv_freq, scale, torch.bfloat16)
        for got, ref in ((cos, ref_cos[..., :64]), (sin, ref_sin[..., :64])):
            got, ref = got.float(), ref.float()
            normal = ref.abs() >= 2**-14
            assert torch.equal(got[normal], ref[normal])
            assert (got - ref).abs().max() <= 2**-25
    assert kernels.rope_tables(positions, inv_freq, 1.0, torch.float32)[0].dtype == torch.float32


def test_bf16_rope_tables_give_the_same_result(poisoned):
    """Tables passed in bf16 (values that fit fp16 exactly) give what the fp16 ones give."""
    case = cast(make_case(2, 77, 2, 4, 64, [13, 38], 45, seed=7), torch.float16)
    tables = kernels.rope_tables(case["positions"], case["inv_freq"], 1.0, torch.bfloat16)
    assert tables[0].dtype == torch.float16
    got16 = kernels.latent_decode_attention(**case, tables=tables)
    got_bf16 = kernels.latent_decode_attention(**case, tables=tuple(t.to(torch.bfloat16) for t in tables))
    assert torch.equal(got16, got_bf16)


def test_quantized_rows_at_odd_bytes_are_refused():
    """The kernel loads the fp16 scales as such: rows must start at an even byte and have even strides."""
    case = cast(make_case(1, 8, 1, 2, 64, [32], 32), torch.float32)
    codecs = (latent_quant.LatentCodec([32], [0], 32), latent_quant.LatentCodec([32], [0], 32))
    keys, values = (codec.encode(case[name]) for codec, name in zip(codecs, ("key_latents", "value_latents")))
    odd = torch.zeros(keys.numel() + 1, dtype=torch.uint8)[1:].view(keys.shape)
    odd.copy_(keys)
    with pytest.raises(ValueError, match="even byte"):
        kernels.latent_decode_attention(**dict(case, key_latents=odd, value_latents=values), codecs=codecs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [0, 3, 4, 9])
def test_quantized_value_pairs_apart(poisoned, values_launches, dtype, case):
    """The values pass by scale group with even and odd channels multiplied and accumulated apart
    (`values_pairs_apart`): odd 4-bit parts, blocks of 128 columns, three groups a block, 8-byte aligned rows."""
    check_quantized(dtype, *QUANT_CASES[case][:-1], QUANT_CASES[case][-1], config={"values_pairs_apart": True})
    assert [launch["APART"] for launch in values_launches] == [True]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [1, 3, 5, 8, 10])
@pytest.mark.parametrize("prefetch, words", [(False, False), (True, False), (False, True), (True, True)])
def test_quantized_value_scales_prefetched(poisoned, values_launches, dtype, case, prefetch, words):
    """The values pass by scale group with each next tile's scales loaded a tile ahead (`values_prefetch`, the
    default) or each tile's when it is worked on, read as 2 bytes or from their 4-byte words where rows are 4-byte
    aligned (`value_scale_words`): a ragged last group, 8-bit groups, rows in whole words or 16-byte aligned."""
    config = {"values_prefetch": prefetch, "value_scale_words": words}
    check_quantized(dtype, *QUANT_CASES[case][:-1], QUANT_CASES[case][-1], config=config)
    assert [(launch["PREFETCH"], launch["WORDS"]) for launch in values_launches] == [(prefetch, words)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [0, 5, 7, 8, 9, 10, 11])
def test_quantized_key_scales_read_as_words(poisoned, scores_launches, dtype, case):
    """`key_scale_words`: the unfolded pass reads each token's key scales from their 4-byte words where rows are
    4-byte aligned (cases 5-10: whole words, 8- and 16-byte rows; scales at both halves of a word), and as 2-byte
    values where they are not (cases 0 and 11, a slice of a larger cache)."""
    check_quantized(dtype, *QUANT_CASES[case][:-1], QUANT_CASES[case][-1], config={"key_scale_words": True})
    assert [(launch["WORDS"], launch["FOLD"]) for launch in scores_launches] == [(True, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [1, 3])
def test_quantized_values_dequantized_per_value(poisoned, dtype, case):
    """The values pass that dequantizes per value (`grouped_values` off), on groups of 32."""
    check_quantized(dtype, *QUANT_CASES[case][:-1], QUANT_CASES[case][-1], config={"grouped_values": False})


def check_quantized(dtype, groups, k_ranks, k_n8, v_rank, v_n8, group, extras, config=None, place=None):
    """
    The kernel on the codecs' rows against the reference on the decoded rows. extras: make_case's, plus "align" (the
    codecs') and "embedded" (the rows as a slice of a larger cache); `place` puts each rows tensor where it is read.
    """
    extras = dict(extras)
    align, embedded = extras.pop("align", latent_quant.ROW_ALIGN), extras.pop("embedded", False)
    case = make_case(2, 101, len(k_ranks), groups, 64, k_ranks, v_rank, seed=20 + groups, **extras)
    codecs = tuple(
        latent_quant.LatentCodec(ranks, n8, group, align) for ranks, n8 in ((k_ranks, k_n8), ([v_rank], [v_n8]))
    )
    inputs = cast(case, dtype)
    rows = [codec.encode(inputs[name]) for codec, name in zip(codecs, ("key_latents", "value_latents"))]
    rows = [_embedded(r) if embedded else r for r in rows]
    rows = [place(r) if place else r for r in rows]
    decoded = [codec.decode(r.cpu(), torch.float64) for codec, r in zip(codecs, rows)]
    expected = kernels.latent_decode_reference(
        **dict(cast(case, torch.float64), key_latents=decoded[0].to(DEVICE), value_latents=decoded[1].to(DEVICE))
    ).cpu()
    quantized = dict(inputs, key_latents=rows[0], value_latents=rows[1])
    got = kernels.latent_decode_attention(**quantized, codecs=codecs, config=config)
    got = got.cpu().double()
    assert not torch.isnan(got).any()
    error = (got - expected).norm() / expected.norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"
    # and the quantization is really there: the unquantized latents give a different result
    exact = kernels.latent_decode_reference(**cast(case, torch.float64)).cpu()
    assert (exact - expected).norm() / exact.norm() > 10 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_ranks, k_n8", [([13, 38], [0, 10]), ([100, 9], [0, 4])])
def test_quantized_keys_dequantized_per_value(poisoned, dtype, k_ranks, k_n8):
    """The per-value key dequantization: with `grouped_keys` off, and where a head has more than three groups."""
    config = {"grouped_keys": False} if max(k_ranks) < 100 else None
    check_quantized(dtype, 4, k_ranks, k_n8, 45, 12, 32, {}, config=config)


def test_key_slots():
    """The grouped key rebuild covers up to three scale groups per head, in groups of 32 or more (powers of two)."""
    codec = latent_quant.LatentCodec
    assert kernels._key_slots(codec([13, 38], [0, 10], 32), True) == 2
    assert kernels._key_slots(codec([64, 9], [10, 9], 32), True) == 3
    assert kernels._key_slots(codec([32, 32], [0, 32], 32), True) == 1
    assert kernels._key_slots(codec([100], [0], 32), True) == 0  # four groups
    assert kernels._key_slots(codec([100], [0], 64), True) == 2
    assert kernels._key_slots(codec([38], [0], 16), True) == 0
    assert kernels._key_slots(codec([38], [0], 48), True) == 0
    assert kernels._key_slots(codec([38], [0], 32), False) == 0


def test_unknown_launch_setting_is_refused():
    case = cast(make_case(1, 8, 1, 2, 64, [4], 8), torch.float32)
    with pytest.raises(ValueError, match="unknown launch settings"):
        kernels.latent_decode_attention(**case, config={"value_blocks": 64})


def test_rank_chunks():
    """Ranks padded to 16 in two power-of-two chunks; aligned windows cover up to 7 leading columns."""
    assert kernels._rank_chunks([38], 16, False) == (32, 16)
    assert kernels._rank_chunks([38], 16, True) == (32, 16)
    assert kernels._rank_chunks([38], 0, False) == (64, 0)
    assert kernels._rank_chunks([1], 16, False) == (16, 0)
    assert kernels._rank_chunks([64, 3], 16, True) == (64, 16)
    assert kernels._rank_chunks([100], 16, False) == (64, 64)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
def test_model_decodes_the_same_through_the_kernel(monkeypatch, family, converted, tokenizer):
    """generate() with the kernel forced on (interpreted on CPU) gives the PyTorch path's tokens and logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted(family, kv_ratio=0.5), trust_remote_code=True).eval()
    check_generate_paths(monkeypatch, model, tokenizer, 1e-3)


@pytest.mark.parametrize(
    "family, bits, align", [("llama3", "mixed", None), ("qwen3", "4", None), ("qwen2", "mixed", 1)]
)
def test_quantized_model_decodes_the_same_through_the_kernel(monkeypatch, family, bits, align, converted, tokenizer):
    """With --kv-bits the cache holds uint8 rows (word-aligned by default, or compact); the kernel dequantizes them as
    the PyTorch path does."""
    from transformers import AutoModelForCausalLM

    folder = converted(family, kv_ratio=0.5, kv_bits=bits, **({"kv_row_align": align} if align else {}))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    check_generate_paths(monkeypatch, model, tokenizer, 1e-3)


@pytest.mark.parametrize("family, bits", [("llama3", None), ("mistral", None), ("llama-mha", "4")])
def test_half_precision_model_decodes_close_through_the_kernel(monkeypatch, family, bits, converted, tokenizer):
    """In fp16 the model hands the kernel RoPE tables computed once per step; logits stay within fp16 rounding.
    With one query head per KV head and quantized latents (llama-mha, 4 bits) the kernel folds the query into the
    up-projection."""
    from transformers import AutoModelForCausalLM

    folder = converted(family, kv_ratio=0.5, **({"kv_bits": bits} if bits else {}))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float16).eval()
    modeling = importlib.import_module(type(model).__module__)  # the checkpoint's own copy of the kernel
    launches = record_launches(monkeypatch, "_scores_kernel", sys.modules[modeling.latent_decode_attention.__module__])
    check_generate_paths(monkeypatch, model, tokenizer, 5e-2, tokens_equal=False)
    assert launches and {launch["FOLD"] for launch in launches} == {family == "llama-mha"}


def check_generate_paths(monkeypatch, model, tokenizer, tolerance, tokens_equal=True):
    model.to(DEVICE)
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Short", "A longer prompt that needs no padding"], return_tensors="pt", padding=True)
    inputs = inputs.to(DEVICE)
    steps = 12 if tokens_equal else 2  # rounding may break a near-tie later: then only the prefill step and the
    # first kernel step compare
    kwargs = dict(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    results = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("STARKV_DECODE_KERNEL", choice)
        results[choice] = model.generate(**inputs, **kwargs)
    if tokens_equal:
        assert torch.equal(results["torch"].sequences, results["triton"].sequences)
    assert len(results["torch"].scores) == steps
    for a, b in zip(results["torch"].scores, results["triton"].scores):
        assert torch.equal(torch.isinf(a), torch.isinf(b))  # min_new_tokens masks EOS with -inf
        assert (a - b)[torch.isfinite(a)].abs().max() <= tolerance


def test_kernel_switch(monkeypatch):
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "torch")
    assert not kernels.use_decode_kernel(torch.device(DEVICE))
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "triton")
    assert kernels.use_decode_kernel(torch.device("cpu"))
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "auto")
    assert kernels.use_decode_kernel(torch.device("cpu")) is False
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="use auto, triton or torch"):
        kernels.use_decode_kernel(torch.device("cpu"))


def assert_tables_follow_positions(cache, inv_freq: torch.Tensor, scaling: float) -> None:
    """The cache's kept fp16 RoPE tables are exactly those made at once from its positions."""
    assert cache.rope_tables is not None
    made = kernels.rope_tables(cache.positions, inv_freq, scaling, torch.float16)
    assert all(torch.equal(kept, expected) for kept, expected in zip(cache.rope_tables, made))


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("llama3", dict(cache_implementation="static")),
        ("mistral", dict(prefill_chunk_size=5)),  # sliding window: the cache trims its oldest tokens
    ],
)
def test_cache_keeps_the_rope_tables_of_its_positions(monkeypatch, family, kwargs, converted, tokenizer, record_caches):
    """
    A 16-bit model decoding through the kernel keeps the RoPE tables in the cache, each token's made once: after
    generate() they are the tables of the cache's positions, as if made from all of them at once.
    """
    from transformers import AutoModelForCausalLM

    folder = converted(family, kv_ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float16).eval()
    model.to(DEVICE)
    monkeypatch.setenv("STARKV_DECODE_KERNEL", "triton")
    tokenizer.padding_side = "left"
    prompts = ["Short", "A longer prompt that needs no padding, and longer than the tiny mistral's sliding window"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(DEVICE)
    caches = record_caches(model)
    model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, **kwargs)
    assert caches[0].positions.shape[0] == len(prompts)
    assert_tables_follow_positions(caches[0], model.model.rotary_emb.inv_freq, model.model.rotary_emb.attention_scaling)


def test_cache_operations_keep_rope_tables_with_positions(converted):
    """Beam reordering, batch selection and repetition, and cropping apply to the kept RoPE tables as to positions."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(converted("llama3", kv_ratio=0.5), trust_remote_code=True)
    cache = import_remote("cache_starkv").StarKVCache(config)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)

    def append(positions):
        cache.update_positions(positions, len(positions), (inv_freq, 1.0, torch.float16))
        for i in range(config.num_hidden_layers):
            shape = (len(positions), positions.shape[1])
            cache.update_latents(torch.randn(*shape, sum(config.kv_k_ranks[i])), torch.randn(*shape, 4), i)

    def check():
        assert_tables_follow_positions(cache, inv_freq, 1.0)

    append(torch.arange(5)[None] + torch.tensor([[0], [7], [100]]))  # a different position in every sequence
    append(torch.tensor([[5], [12], [105]]))
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    check()
    assert cache.positions[0, -1] == 105
    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.batch_repeat_interleave(2)
    check()
    assert cache.positions.shape == (4, 6)
    cache.crop(-2)
    check()
    assert cache.rope_tables[0].shape[:2] == (4, 4)


@pytest.mark.parametrize("family, static", [("llama3", True), ("mistral", False)])  # mistral: sliding window
def test_rope_tables_follow_positions_written_off_the_kernel(monkeypatch, family, static, converted):
    """
    Positions the cache takes while the kernel is off (STARKV_DECODE_KERNEL=torch for some steps) or by hand still get
    their RoPE tables: switching back to the kernel gives the logits of a run on the kernel throughout.
    """
    from transformers import AutoModelForCausalLM

    folder = converted(family, kv_ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float16).eval()
    caches = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".cache_starkv")  # the checkpoint's
    ids = torch.randint(1, 300, (2, 30), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run(kernel_off_steps: int) -> tuple[object, list[torch.Tensor]]:
        cache = caches.StarKVStaticCache(model.config, 64) if static else caches.StarKVCache(model.config)
        monkeypatch.setenv("STARKV_DECODE_KERNEL", "triton")
        token = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        logits = []
        for step in range(6):
            monkeypatch.setenv("STARKV_DECODE_KERNEL", "torch" if step < kernel_off_steps else "triton")
            logits.append(model(input_ids=token, past_key_values=cache).logits[:, -1].float())
            token = logits[-1].argmax(-1, keepdim=True)
        return cache, logits

    _, on_kernel = run(0)
    cache, switched = run(3)
    for a, b in zip(on_kernel[3:], switched[3:]):
        assert (a - b).abs().max() < 2e-2  # fp16 rounding; stale tables were off by > 0.3
    rotary = model.model.rotary_emb
    assert_tables_follow_positions(cache, rotary.inv_freq, rotary.attention_scaling)
    cache.update_positions(torch.arange(36, 40)[None], 2)  # appended by hand, as benchmarks fill caches
    assert_tables_follow_positions(cache, rotary.inv_freq, rotary.attention_scaling)
