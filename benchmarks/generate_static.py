"""
Decode through generate() with static caches and torch.compile (CUDA graphs), stock Llama-3.1-8B shape (random bf16
weights) against STAR-KV K 30% / V 50%: the best way transformers runs each model (issue 6).

    python benchmarks/generate_static.py [--context 32768] [--batches 15 38] [--new-tokens 24]

Each cache is prefilled with random entries of `--context` tokens (prefill is not timed), then generate() decodes
`--new-tokens` greedy tokens twice: the first call compiles, the second is timed step by step (a logits processor
records the time at every step; the median step is reported). Batches that do not fit are reported as such.
"""

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402
from generate import build_bf16, starkv_model, stock_model  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402


class StepTimes:
    """A logits processor that records the time at every decode step (after a device synchronization)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def static_cache(model, batch: int, tokens: int, slots: int):
    """A static cache of `slots` slots holding `tokens` random entries per sequence."""
    config, g = model.config, torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    if config.model_type == "starkv":
        cache = import_remote("cache_starkv").StarKVStaticCache(config, slots)
        cache.update_positions(torch.arange(tokens, device="cuda")[None], batch)
        for i in range(config.num_hidden_layers):
            zk = torch.randn(batch, tokens, sum(config.kv_k_ranks[i]), **bf16)
            cache.update_latents(zk, torch.randn(batch, tokens, config.kv_v_ranks[i], **bf16), i)
        return cache
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=slots)
    for i in range(config.num_hidden_layers):
        k = torch.randn(batch, config.num_key_value_heads, tokens, config.head_dim, **bf16)
        cache.update(k, torch.randn_like(k), i)
    return cache


@torch.no_grad()
def decode(model, batch: int, tokens: int, new_tokens: int) -> dict:
    """Median ms per compiled decode step of generate() at `batch` and `tokens` of context, and the peak memory."""
    cache = static_cache(model, batch, tokens, tokens + 2 * new_tokens + 2)
    ids = torch.randint(0, 1000, (batch, tokens + 1), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ids = model.generate(ids, past_key_values=cache, **kwargs)  # compiles
    compile_s = time.perf_counter() - start
    steps = StepTimes()
    model.generate(ids, past_key_values=cache, logits_processor=[steps], **kwargs)
    gaps = [b - a for a, b in zip(steps.times[1:], steps.times[2:])]  # decode steps only
    ms = statistics.median(gaps) * 1e3
    return {"ms_per_step": ms, "tokens_per_s": batch / ms * 1e3, "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
            "first_call_s": compile_s}  # fmt: skip


def measure(name: str, build, batches: list[int], tokens: int, new_tokens: int) -> list[dict]:
    model = build_bf16(build)
    rows = []
    for batch in batches:
        row = {"model": name, "batch": batch, "context": tokens}
        try:
            row.update(decode(model, batch, tokens, new_tokens))
        except torch.OutOfMemoryError:
            row["out_of_memory"] = True
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # a fresh compilation per shape, as a new process would make
        print(row, flush=True)
        rows.append(row)
    model = None
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--stock-batches", type=int, nargs="+", default=[15])
    p.add_argument("--batches", type=int, nargs="*", default=[15, 38])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    rows = measure("stock, SDPA, StaticCache, compiled", stock_model, args.stock_batches, args.context, args.new_tokens)
    rows += measure("STAR-KV K30%/V50%, StarKVStaticCache, compiled", starkv_model, args.batches, args.context,
                    args.new_tokens)  # fmt: skip
    result = {"benchmark": "generate_static", **environment(), "context": args.context, "rows": rows}
    path = write_results("generate_static", result, args.out)
    print(f"wrote {path}")
    print(f"{'model':48s} {'batch':>5s} {'ms/step':>8s} {'tok/s':>7s} {'peak GB':>8s}")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"{r['model']:48s} {r['batch']:5d} out of memory")
        else:
            print(
                f"{r['model']:48s} {r['batch']:5d} {r['ms_per_step']:8.1f} {r['tokens_per_s']:7.1f} {r['peak_GB']:8.1f}"
            )


if __name__ == "__main__":
    main()
