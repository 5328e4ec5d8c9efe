"""The GPU benchmark flows, run on the CPU with a tiny model (`generate_static.py --tiny`), so they cannot rot."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generate_static  # noqa: E402

STOCK, OURS, OURS_4BIT = generate_static.STOCK, generate_static.OURS["16"], generate_static.OURS["4"]


def run(tmp_path, *args: str) -> list[dict]:
    rows = generate_static.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "3", *args])
    assert json.loads(next(tmp_path.glob("*_tiny.json")).read_text())["rows"] == rows
    return rows


def test_random_fill_rows(tmp_path):
    rows = run(tmp_path, "--contexts", "40", "72", "--stock-batches", "40:2", "--batches", "3")
    assert [(r["model"], r["context"], r["batch"]) for r in rows] == [(STOCK, 40, 2), (OURS, 40, 3), (OURS, 72, 3)]
    assert all(r["ms_per_step"] > 0 and not r.get("out_of_memory") for r in rows)


def test_chunked_prefill_rows(tmp_path):
    rows = run(
        tmp_path, "--prefill", "--prefill-chunk", "16", "--contexts", "48", "--stock-batches", "2", "--batches", "2"
    )
    assert [r["model"] for r in rows] == [STOCK, OURS]
    assert all(r["prefill_s"] > 0 and r["ms_per_step"] > 0 for r in rows)


@pytest.mark.parametrize("build", ["tiny_stock_model", "tiny_starkv_model"])
@torch.no_grad()
def test_chunked_prefill_continues_as_generate(monkeypatch, build):
    """The benchmark's eager chunked prefill fills the static cache so that generate() goes on as from scratch."""
    monkeypatch.setattr(generate_static, "DEVICE", "cpu")
    model = getattr(generate_static, build)().float()
    ids = torch.randint(1, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = generate_static.static_cache(model, 2, 1, 48)
    cache.reset()
    logits = generate_static.chunked_prefill(model, cache, ids, 16)  # chunks of 16, 16 and 8
    assert cache.get_seq_length() == 40
    torch.testing.assert_close(logits, model(input_ids=ids).logits[:, -1], rtol=1e-4, atol=1e-5)
    kwargs = generate_static.generate_kwargs(3)
    ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    continued = model.generate(ids, **generate_static.with_cache(cache), **kwargs)
    assert torch.equal(continued, model.generate(ids, **kwargs))


def test_largest_batch_follows_cache_size(tmp_path):
    """Under the simulated memory limit, the smaller latent cache fits more sequences, and a larger limit more still."""
    small = {r["model"]: r["batch"] for r in run(tmp_path, "--largest", "--contexts", "64", "--tiny-memory", "300000")}
    large = {r["model"]: r["batch"] for r in run(tmp_path, "--largest", "--contexts", "64", "--tiny-memory", "600000")}
    assert 0 < small[STOCK] < small[OURS]
    assert small[STOCK] <= large[STOCK] and small[OURS] < large[OURS]


def test_fit_test_takes_a_chunk_longer_than_the_context(monkeypatch):
    monkeypatch.setattr(generate_static, "DEVICE", "cpu")
    monkeypatch.setattr(generate_static, "FAKE_MEMORY", None)
    model = generate_static.tiny_starkv_model().float()
    assert generate_static.fits(model, 2, 40, 3, chunk=64)


def test_four_bit_latents_fit_more_sequences(tmp_path, monkeypatch):
    """--kv-bits 4: the cache holds codes and scales (uint8 rows), and more sequences fit under the same limit."""
    for name in ("K_RANK", "V_RANK", "FOUR_BIT"):  # main() sets them; restored after the test
        monkeypatch.setattr(generate_static.generate, name, getattr(generate_static.generate, name))
    args = ("--largest", "--contexts", "64", "--models", "starkv", "--tiny-memory", "300000")
    (bf16,) = run(tmp_path, *args)
    (tmp_path / "generate_static_largest_tiny.json").unlink()
    (four_bit,) = run(tmp_path, *args, "--kv-bits", "4")
    assert (bf16["model"], four_bit["model"]) == (OURS, OURS_4BIT)
    assert four_bit["batch"] > bf16["batch"] > 0 and four_bit["ms_per_step"] > 0
    monkeypatch.setattr(generate_static, "DEVICE", "cpu")
    cache = generate_static.static_cache(generate_static.tiny_starkv_model(), 2, 8, 16)
    assert cache.layers[0].keys.dtype == torch.uint8
