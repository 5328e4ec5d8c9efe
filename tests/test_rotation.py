"""The rotation of each block's 4-bit latent channels (starkv_convert/rotation.py): exact at full precision, less
error once quantized, measured by --kv-bits auto as exported, reported."""

import json

import pytest
import torch
from conftest import quick_convert_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from starkv_convert.build import build_model
from starkv_convert.cli import convert_main
from starkv_convert.quant_split import flat_n8, measure_split_errors, split_errors_of
from starkv_convert.ranks import RankPlan, quantization_plan
from starkv_convert.rotation import (
    CHUNK,
    rotate_4bit_channels,
    rotate_rows,
    rotates_any,
    tail_chunks,
    tail_rotation,
    unrotate_rows,
)


def test_tail_rotation_is_a_fixed_orthogonal_matrix():
    for size in (2, 13, 38, 128, CHUNK + 1, 2 * CHUNK + 40):
        q = tail_rotation(size)
        assert q.shape == (size, size) and q.dtype == torch.float64
        assert torch.allclose(q @ q.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
        assert not torch.allclose(q.abs(), torch.eye(size, dtype=torch.float64))  # it mixes channels
        torch.manual_seed(size)  # the global generator plays no part
        assert torch.equal(q, tail_rotation(size))
    big = tail_rotation(2 * CHUNK + 40)  # block-diagonal over chunks of at most CHUNK channels
    assert tail_chunks(2 * CHUNK + 40) == [CHUNK, CHUNK, 40] and tail_chunks(1) == []
    assert torch.equal(big[:CHUNK, :CHUNK], tail_rotation(CHUNK)) and not big[:CHUNK, CHUNK:].any()
    assert torch.equal(big[2 * CHUNK :, 2 * CHUNK :], tail_rotation(40))


def test_rows_rotate_after_n8_and_back():
    z = torch.randn(5, 7, 40, dtype=torch.float64)
    for n8 in (0, 8, 39, 40):
        r = rotate_rows(z, n8)
        assert torch.equal(r[..., :n8], z[..., :n8])
        assert torch.allclose(r[..., n8:], z[..., n8:] @ tail_rotation(40 - n8).T, atol=1e-12)  # as exported: Q A
        assert torch.allclose(unrotate_rows(r, n8), z, atol=1e-12)
        assert torch.allclose(r.norm(dim=-1), z.norm(dim=-1), atol=1e-12)  # orthogonal
        assert torch.equal(r, z) == (n8 >= 39)  # one channel or none left: nothing to rotate
    wide = torch.randn(3, CHUNK + 60, dtype=torch.float64)
    assert torch.allclose(rotate_rows(wide, 20)[:, 20:], wide[:, 20:] @ tail_rotation(CHUNK + 40).T, atol=1e-12)


def test_rotates_any():
    plan = RankPlan(k=[None, [10, 3]], v=[None, 12])
    assert rotates_any(plan, {"k_n8": [None, [10, 3]], "v_n8": [None, 11]}) is False  # tails of 0, 0 and 1 channels
    assert rotates_any(plan, {"k_n8": [None, [10, 1]], "v_n8": [None, 12]}) is True


def test_rotation_lowers_the_4bit_error_of_ordered_latents():
    """Latents whose spread falls with the channel index (as singular-value order gives) lose less in 4 bits rotated;
    all-8-bit splits are untouched."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 38, generator=g) * torch.logspace(0, -1.5, 38)
    up = torch.randn(64, 38, generator=g)
    plain, energy = split_errors_of(z, up, 32)
    rotated, energy_r = split_errors_of(z, up, 32, rotate=True)
    assert energy == energy_r
    assert rotated[0] < 0.6 * plain[0]  # every channel in 4 bits (measured: 0.47x)
    assert rotated[8] < 0.8 * plain[8]  # 8 leading channels in 8 bits, the rest rotated
    assert rotated[38] == plain[38]


@pytest.fixture(scope="module")
def energy_model(converted):
    folder = converted("llama", kv_ratio=0.5, method="energy")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_rotated_factors_give_the_same_model(energy_model):
    """B Q^T Q A = B A: logits unchanged at full precision; only each block's channels past its n8 change."""
    config = energy_model.config
    plan = RankPlan(k=config.kv_k_ranks, v=config.kv_v_ranks)
    kv_quant = quantization_plan(plan, "mixed", 0.25)
    state = {k: v.clone() for k, v in energy_model.state_dict().items()}
    rotated = dict(state)
    rotate_4bit_channels(rotated, plan, kv_quant)
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = build_model(config, state, "cpu")(ids).logits
        b = build_model(config, rotated, "cpu")(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    layer = next(i for i, k in enumerate(plan.k) if k is not None)
    prefix = f"model.layers.{layer}.self_attn."
    down, down_r = state[prefix + "k_a_proj.weight"], rotated[prefix + "k_a_proj.weight"]
    start = 0
    for rank, n8 in zip(plan.k[layer], kv_quant["k_n8"][layer]):
        assert torch.equal(down[start : start + n8], down_r[start : start + n8])
        if rank - n8 >= 2:
            assert not torch.allclose(down[start + n8 : start + rank], down_r[start + n8 : start + rank])
        start += rank
    v_n8 = kv_quant["v_n8"][layer]
    v_down, v_down_r = state[prefix + "v_a_proj.weight"], rotated[prefix + "v_a_proj.weight"]
    assert torch.equal(v_down[:v_n8], v_down_r[:v_n8]) and not torch.allclose(v_down[v_n8:], v_down_r[v_n8:])


def test_measured_split_errors_are_those_of_the_exported_rotation(energy_model, tokenizer, corpus):
    """What auto measures for a split (rotate=True, on the unrotated model) is the error the exported checkpoint's
    codecs make: its rotated latents measured as they are, block by block."""
    config = energy_model.config
    plan = RankPlan(k=config.kv_k_ranks, v=config.kv_v_ranks)
    lines = [line for line in corpus.read_text().splitlines() if line.strip()][-40:]
    blocks = tokenizer("\n".join(lines), return_tensors="pt")["input_ids"][:, :128].view(2, 64)
    measured = measure_split_errors(energy_model, blocks, progress=False, rotate=True)
    for bits, share in (("4", 0.0), ("mixed", 0.25), ("mixed", 0.5)):
        kv_quant = quantization_plan(plan, bits, share)
        state = {k: v.clone() for k, v in energy_model.state_dict().items()}
        rotate_4bit_channels(state, plan, kv_quant)
        exported = measure_split_errors(build_model(config, state, "cpu"), blocks, progress=False)
        for ours, theirs, n8 in zip(measured.errors, exported.errors, flat_n8(plan, kv_quant)):
            assert float(ours[n8]) == pytest.approx(float(theirs[n8]), rel=1e-3)


def _factors(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_cli_4bit_conversion_rotates_and_says_so(tmp_path, base_dir, corpus):
    """The written checkpoint holds Q A and B Q^T of the factors a --no-kv-rotate conversion writes."""
    rotated, plain = tmp_path / "rotated", tmp_path / "plain"
    args = ("--kv-bits", "4", "--method", "energy")
    assert convert_main(quick_convert_args(base_dir("llama"), rotated, corpus, *args)) == 0
    assert convert_main(quick_convert_args(base_dir("llama"), plain, corpus, *args, "--no-kv-rotate")) == 0
    reports = [json.loads((out / "starkv_report.json").read_text()) for out in (rotated, plain)]
    assert reports[0]["quantization"]["rotated_4bit"] is True and reports[1]["quantization"]["rotated_4bit"] is False
    assert "rotated by a fixed orthogonal matrix" in (rotated / "README.md").read_text()
    assert "rotated by a fixed orthogonal matrix" not in (plain / "README.md").read_text()
    assert all(r["validation"]["passed"] for r in reports)
    ours, theirs = _factors(rotated), _factors(plain)
    config = json.loads((plain / "config.json").read_text())
    layer = next(i for i, k in enumerate(config["kv_k_ranks"]) if k is not None)
    prefix = f"model.layers.{layer}.self_attn."
    start = 0
    for rank in config["kv_k_ranks"][layer]:
        rows, q = slice(start, start + rank), tail_rotation(rank).float()
        assert torch.allclose(ours[prefix + "k_a_proj.weight"][rows], q @ theirs[prefix + "k_a_proj.weight"][rows],
                              atol=1e-5)  # fmt: skip
        assert torch.allclose(ours[prefix + "k_b_proj.weight"][:, rows],
                              theirs[prefix + "k_b_proj.weight"][:, rows] @ q.T, atol=1e-5)  # fmt: skip
        start += rank
    q = tail_rotation(config["kv_v_ranks"][layer]).float()
    assert torch.allclose(ours[prefix + "v_a_proj.weight"], q @ theirs[prefix + "v_a_proj.weight"], atol=1e-5)


def test_cli_auto_measures_with_the_rotation(tmp_path, base_dir, corpus):
    """--kv-bits auto measures its split errors as it will export them: with the rotation every all-4-bit split
    loses less, so the report's errors differ from a --no-kv-rotate conversion's."""
    errors = []
    for name, extra in (("rotated", ()), ("plain", ("--no-kv-rotate",))):
        out = tmp_path / name
        args = quick_convert_args(base_dir("llama"), out, corpus, "--kv-bits", "auto", "--method", "energy", *extra)
        assert convert_main(args) == 0
        errors.append(json.loads((out / "starkv_report.json").read_text())["quantization"]["relative_error"])
    rotated, plain = errors
    assert rotated["all_4bit"]["total"] < 0.9 * plain["all_4bit"]["total"]
    assert rotated["all_8bit"]["total"] == pytest.approx(plain["all_8bit"]["total"], rel=1e-6)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--no-kv-rotate"], "--kv-rotate / --no-kv-rotate apply to 4-bit latent channels"),
        (["--kv-bits", "8", "--kv-rotate"], "--kv-rotate / --no-kv-rotate apply to 4-bit latent channels"),
    ],
)
def test_rotation_flags_without_4bit_channels_are_refused(capsys, tmp_path, base_dir, args, expected):
    capsys.readouterr()
    assert convert_main([str(base_dir("llama")), "-o", str(tmp_path / "out"), "-q", *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("starkv: error: ") and expected in last, last
