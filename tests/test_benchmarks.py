"""The GPU benchmark flows, run on the CPU with a tiny model (`generate_static.py --tiny`), so they cannot rot."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
generate_static = pytest.importorskip("generate_static")

STOCK, OURS = generate_static.STOCK, generate_static.OURS


def run(tmp_path, *args: str) -> list[dict]:
    rows = generate_static.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "3", *args])
    assert json.loads(next(tmp_path.glob("*_tiny.json")).read_text())["rows"] == rows
    return rows


def test_random_fill_rows(tmp_path):
    rows = run(tmp_path, "--contexts", "40", "72", "--stock-batches", "40:2", "--batches", "3")
    assert [(r["model"], r["context"], r["batch"]) for r in rows] == [(STOCK, 40, 2), (OURS, 40, 3), (OURS, 72, 3)]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3)


def test_chunked_prefill_rows(tmp_path):
    rows = run(
        tmp_path, "--prefill", "--prefill-chunk", "16", "--contexts", "40", "--stock-batches", "2", "--batches", "2"
    )
    assert len(rows) == 2
    for r in rows:
        assert r["prefill_s"] > 0 and r["prefill_tokens_per_s"] == pytest.approx(2 * 40 / r["prefill_s"])
        assert r["ms_per_step"] > 0


def test_largest_batch_follows_cache_size(tmp_path):
    """Under the simulated memory limit, the smaller latent cache fits more sequences, and a larger limit more still."""
    small = {r["model"]: r["batch"] for r in run(tmp_path, "--largest", "--fit-prefill", "--prefill-chunk", "16",
                                                  "--contexts", "64", "--tiny-memory", "300000")}  # fmt: skip
    large = {r["model"]: r["batch"] for r in run(tmp_path, "--largest", "--contexts", "64", "--tiny-memory", "600000")}
    assert 0 < small[STOCK] < small[OURS]
    assert small[STOCK] <= large[STOCK] and small[OURS] < large[OURS]
