"""--kv-bits auto: the converter measures, per block, the key/value error of every 8/4-bit split on calibration
tokens and spends mixed's bytes per token where they remove the most error; the checkpoint is an ordinary quantized
one (same `kv_quant` structure), and the report and card say what was chosen."""

import json

import pytest
import torch
from conftest import quick_convert_args
from transformers import AutoModelForCausalLM

from starkv_convert.cli import convert_main
from starkv_convert.errors import StarKVError
from starkv_convert.quant_split import choose_split, flat_n8, latent_bytes, measure_split_errors
from starkv_convert.ranks import RankPlan, quantization_plan
from starkv_convert.remote_code import import_remote

quant = import_remote("latent_quant")
ops = import_remote("latent_ops")


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def _report(folder) -> dict:
    return json.loads((folder / "starkv_report.json").read_text())


def _plan(config) -> RankPlan:
    return RankPlan(k=config.kv_k_ranks, v=config.kv_v_ranks)


def _codec_bytes(config) -> int:
    """Latent bytes per token of a quantized config, as the model's own codecs count them."""
    group, total = config.kv_quant["group"], 0
    for i, k in enumerate(config.kv_k_ranks):
        if k is not None:
            total += quant.LatentCodec(k, config.kv_quant["k_n8"][i], group).bytes_per_token
            total += quant.LatentCodec([config.kv_v_ranks[i]], [config.kv_quant["v_n8"][i]], group).bytes_per_token
    return total


def _block_bytes(plan: RankPlan, kv_quant: dict, side: str = "kv") -> int:
    """What `choose_split` budgets: the blocks' codes (padded to the rows' alignment) and scales, before each row
    rounds its length up to that alignment (at most align - 2 bytes more a row: 2 at the default 4)."""
    size, group, step, total = quant.quantized_bytes_per_token, kv_quant["group"], quant.ROW_ALIGN, 0
    for k, v, k_n8, v_n8 in zip(plan.k, plan.v, kv_quant["k_n8"], kv_quant["v_n8"]):
        if k is not None:
            total += sum(size(r, n, group, step) for r, n in zip(k, k_n8)) if "k" in side else 0
            total += size(v, v_n8, group, step) if "v" in side else 0
    return total


def _rows(plan: RankPlan) -> int:
    return 2 * sum(k is not None for k in plan.k)


def _held_out(tokenizer, corpus, blocks: int = 4, seq_len: int = 64) -> torch.Tensor:
    """Token blocks from the end of the corpus: the conversions calibrate and evaluate on its first tokens."""
    ids = tokenizer(corpus.read_text())["input_ids"]
    return torch.tensor(ids[-blocks * seq_len :]).view(blocks, seq_len)


def _table(per_channel_4bit: torch.Tensor) -> torch.Tensor:
    """A block's error for n8 = 0..rank when channel i costs a_i in 4 bits and a_i / 300 in 8 bits."""
    a = per_channel_4bit.double()
    return torch.stack([a[:n].sum() / 300 + a[n:].sum() for n in range(len(a) + 1)])


# --- the chooser, on constructed error tables ------------------------------------------------------------------------


def test_a_block_with_a_wide_tail_gets_more_8bit_channels():
    rank, group = 64, 32
    wide = _table(torch.ones(rank))  # its tail channels spread as much as its leading ones
    steep = _table(0.8 ** torch.arange(rank, dtype=torch.float64))  # its tail is tiny
    size = quant.quantized_bytes_per_token
    budget = 2 * size(rank, 16, group)  # mixed at 25%
    n8 = choose_split([steep, wide], budget, group)
    assert n8[1] > 16 > n8[0]
    spent = sum(size(rank, n, group) for n in n8)
    assert budget - 2 <= spent <= budget
    assert steep[n8[0]] + wide[n8[1]] < 0.8 * (steep[16] + wide[16])


def test_chooser_extremes_and_a_budget_too_small():
    tables = [_table(torch.rand(r, generator=torch.Generator().manual_seed(r))) for r in (5, 40, 70)]
    size = quant.quantized_bytes_per_token
    all4 = sum(size(len(t) - 1, 0, 32) for t in tables)
    all8 = sum(size(len(t) - 1, len(t) - 1, 32) for t in tables)
    assert choose_split(tables, all4, 32) == [0, 0, 0]
    assert choose_split(tables, all8, 32) == [5, 40, 70]
    with pytest.raises(StarKVError, match="cannot hold"):
        choose_split(tables, all4 - 1, 32)


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("seed", range(6))
def test_chooser_is_the_optimum_of_small_cases(seed, step):
    """Brute force over every split of three small blocks: nothing within the budget has less error. With a step,
    among 8-bit parts of whole steps (or whole blocks), codes padded to the step."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    ranks, group = [5 + seed, 9, 12 - seed], 4
    tables = [_table(torch.rand(r, generator=g) * torch.logspace(0, -1.5, r)) for r in ranks]
    tables = [t * (1 + 0.05 * torch.rand(len(t), generator=g, dtype=torch.float64)) for t in tables]

    def size(rank, n8, group):
        return quant.quantized_bytes_per_token(rank, n8, group, step)

    budget = sum(size(r, round(0.3 * r), group) for r in ranks)
    n8 = choose_split(tables, budget, group, step)
    assert sum(size(r, n, group) for r, n in zip(ranks, n8)) <= budget
    assert all(n % step == 0 or n == r for n, r in zip(n8, ranks))
    splits = itertools.product(*[[n for n in range(r + 1) if n % step == 0 or n == r] for r in ranks])
    fitting = [s for s in splits if sum(size(r, n, group) for r, n in zip(ranks, s)) <= budget]
    best = min(sum(t[n] for t, n in zip(tables, s)) for s in fitting)
    assert sum(t[n] for t, n in zip(tables, n8)) == pytest.approx(float(best), rel=1e-12)


# --- converted tiny models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, options", [("llama", {}), ("qwen2", {"method": "energy", "kv_8bit_share": 0.5})])
def test_auto_takes_the_bytes_of_mixed(converted, family, options):
    auto = converted(family, kv_ratio=0.5, kv_bits="auto", **options)
    mixed = converted(family, kv_ratio=0.5, kv_bits="mixed", **options)
    a, m = _load(auto).config, _load(mixed).config
    assert a.kv_k_ranks == m.kv_k_ranks and a.kv_v_ranks == m.kv_v_ranks  # the same ranks, split differently
    auto_bytes, mixed_bytes = _codec_bytes(a), _codec_bytes(m)
    auto_blocks, mixed_blocks = _block_bytes(_plan(a), a.kv_quant), _block_bytes(_plan(m), m.kv_quant)
    assert mixed_blocks - 4 <= auto_blocks <= mixed_blocks  # at most one fp16 scale per side below mixed, never above
    assert auto_blocks <= auto_bytes <= auto_blocks + 2 * _rows(_plan(a))  # (the rows' rounding)
    report, mixed_report = _report(auto), _report(mixed)
    measured = report["kv_cache"]["bytes_per_token"]["starkv"]  # read off a real cache (plus 4 B of position)
    assert measured == auto_bytes + 4 and mixed_report["kv_cache"]["bytes_per_token"]["starkv"] == mixed_bytes + 4
    q = report["quantization"]
    assert q["latent_bytes_per_token"] == auto_bytes and q["budget"]["mixed_latent_bytes_per_token"] == mixed_bytes
    assert flat_n8(_plan(a), a.kv_quant) != flat_n8(_plan(m), m.kv_quant)
    assert q["relative_error"]["auto"]["total"] < q["relative_error"]["mixed"]["total"]
    assert q["budget"]["pooled_over"] == "side"  # the default


def test_model_budget_pools_all_blocks(converted):
    """--kv-auto-budget model: mixed's bytes shared by every block of both sides; less total error than mixed."""
    folder = converted("llama", kv_ratio=0.5, kv_bits="auto", method="energy", kv_auto_budget="model")
    model = _load(folder)
    plan, auto = _plan(model.config), model.config.kv_quant
    mixed = quantization_plan(plan, "mixed", 0.25)
    assert _block_bytes(plan, mixed) - 2 <= _block_bytes(plan, auto) <= _block_bytes(plan, mixed)
    assert latent_bytes(plan, auto) <= latent_bytes(plan, mixed) + 2 * _rows(plan)
    q = _report(folder)["quantization"]
    assert q["budget"]["pooled_over"] == "model"
    assert q["relative_error"]["auto"]["total"] <= q["relative_error"]["mixed"]["total"]


def test_measured_error_is_that_of_the_rebuilt_keys_and_values(converted, tokenizer, corpus):
    """A table entry at the checkpoint's split equals the error of the keys/values its own codecs rebuild."""
    model = _load(converted("qwen3", kv_ratio=0.5, kv_bits="auto"))  # learned: up-projections not orthonormal
    blocks = _held_out(tokenizer, corpus, blocks=1)
    errors = measure_split_errors(model, blocks, progress=False)
    n8 = flat_n8(_plan(model.config), model.config.kv_quant)
    layer = 1
    attn = model.model.layers[layer].self_attn
    inputs = []
    handle = attn.k_a_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        model.model(input_ids=blocks, use_cache=False)
        handle.remove()
        (x,) = inputs
        k_codec, v_codec = attn.codecs
        zk, zv = attn.k_a_proj(x), attn.v_a_proj(x)
        keys = ops.rebuild_keys(zk, attn.k_b_proj.weight, attn.k_b_proj.ranks)
        keys_q = ops.rebuild_keys(
            k_codec.decode(k_codec.encode(zk), zk.dtype), attn.k_b_proj.weight, attn.k_b_proj.ranks
        )
        values = zv @ attn.v_b_proj.weight.T
        values_q = v_codec.decode(v_codec.encode(zv), zv.dtype) @ attn.v_b_proj.weight.T
    ours = [b for b, i in enumerate(errors.layers) if i == layer]
    k_blocks = [b for b in ours if errors.sides[b] == "k"]
    (v_block,) = [b for b in ours if errors.sides[b] == "v"]
    k_error = sum(float(errors.errors[b][n8[b]]) for b in k_blocks)
    assert k_error == pytest.approx(float((keys_q - keys).pow(2).sum() / keys.pow(2).sum()), rel=1e-4)
    v_error = float(errors.errors[v_block][n8[v_block]])
    assert v_error == pytest.approx(float((values_q - values).pow(2).sum() / values.pow(2).sum()), rel=1e-4)
    assert all(e[0] > e[-1] > 0 for e in errors.errors)  # 4 bits lose more than 8, and 8 bits still lose a little


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_auto_has_less_error_than_mixed_on_held_out_tokens(converted, tokenizer, corpus, family):
    """Each split measured as a conversion exports it (4-bit channels rotated for that split), on the same factors:
    the unquantized conversion's."""
    auto = _load(converted(family, kv_ratio=0.5, kv_bits="auto", method="energy")).config.kv_quant
    model = _load(converted(family, kv_ratio=0.5, method="energy"))
    plan = _plan(model.config)
    mixed = quantization_plan(plan, "mixed", 0.25)
    assert _block_bytes(plan, auto) <= _block_bytes(plan, mixed)
    errors = measure_split_errors(model, _held_out(tokenizer, corpus), progress=False, rotate=True)
    auto_error, mixed_error = errors.total(flat_n8(plan, auto)), errors.total(flat_n8(plan, mixed))
    assert auto_error < mixed_error


def test_side_budget_keeps_each_sides_bytes(converted):
    """--kv-auto-budget side: keys spend mixed's key bytes and values mixed's value bytes, each among themselves."""
    folder = converted("llama", kv_ratio=0.5, kv_bits="auto", method="energy", kv_auto_budget="side")
    model = _load(folder)
    plan, auto = _plan(model.config), model.config.kv_quant
    mixed = quantization_plan(plan, "mixed", 0.25)
    for side in "kv":  # the bytes of one side's blocks
        auto_side, mixed_side = _block_bytes(plan, auto, side), _block_bytes(plan, mixed, side)
        assert mixed_side - 2 <= auto_side <= mixed_side
    q = _report(folder)["quantization"]
    assert q["budget"]["pooled_over"] == "side" and "mixed's value bytes" in (folder / "README.md").read_text()
    error = q["relative_error"]
    assert error["auto"]["k"] <= error["mixed"]["k"] and error["auto"]["v"] <= error["mixed"]["v"]
    assert error["auto"]["total"] < error["mixed"]["total"]


# --- the command line ------------------------------------------------------------------------------------------------


def test_cli_auto_conversion(tmp_path, base_dir, corpus):
    out = tmp_path / "auto"
    args = quick_convert_args(base_dir("qwen3"), out, corpus, "--kv-bits", "auto", "--kv-auto-blocks", "2")
    assert convert_main(args) == 0
    config = json.loads((out / "config.json").read_text())
    plan = RankPlan(k=config["kv_k_ranks"], v=config["kv_v_ranks"])
    auto, mixed = config["kv_quant"], quantization_plan(plan, "mixed", 0.25)
    assert set(auto) == {"group", "k_n8", "v_n8", "align"} and auto["group"] == 32 and auto["align"] == quant.ROW_ALIGN
    whole = flat_n8(plan, quantization_plan(plan, "8", 0))  # every block's rank
    assert all(n % quant.ROW_ALIGN == 0 or n == r for n, r in zip(flat_n8(plan, auto), whole))  # aligned 4-bit codes
    shares = [n / r for n, r in zip(flat_n8(plan, auto), whole)]
    assert len(set(shares)) > 1 and flat_n8(plan, auto) != flat_n8(plan, mixed)  # ragged, and not mixed's split
    report = _report(out)
    assert report["validation"]["passed"] and report["budget"]["kv_bits"] == "auto"
    q = report["quantization"]
    assert q["method"] == "auto" and q["calibration"]["blocks"] == 2 and q["calibration"]["tokens"] == 64
    assert q["latent_bytes_per_token"] <= q["budget"]["mixed_latent_bytes_per_token"]
    assert q["block_share_8bit"]["min"] < q["share_8bit"] < q["block_share_8bit"]["max"]
    card = (out / "README.md").read_text()
    assert "## Quantized latents" in card and "auto" in card and "8-bit channels (K per head; V)" in card
    assert f"{q['share_8bit']:.1%}" in card and f"{q['latent_bytes_per_token']:,}" in card


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--kv-bits", "auto", "--kv-auto-blocks", "0"], "--kv-auto-blocks must be >= 1"),
        (["--kv-bits", "mixed", "--kv-auto-blocks", "2"], "--kv-auto-blocks applies with --kv-bits auto"),
        (["--kv-bits", "auto", "--kv-8bit-share", "1.5"], "--kv-8bit-share must be in [0, 1]"),
        (["--kv-bits", "8", "--kv-auto-budget", "side"], "--kv-auto-budget applies with --kv-bits auto"),
        (["--kv-row-align", "4"], "--kv-row-align applies to quantized latents"),
    ],
)
def test_bad_auto_options(capsys, tmp_path, base_dir, args, expected):
    out = tmp_path / "out" / "model"
    capsys.readouterr()
    assert convert_main([str(base_dir("llama")), "-o", str(out), "-q", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("starkv: error: ") and expected in lines[-1], lines
    assert not (tmp_path / "out").exists()
