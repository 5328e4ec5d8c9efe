"""
Decode through generate() with static caches and torch.compile (CUDA graphs), stock Llama-3.1-8B shape (random bf16
weights) against STAR-KV K 30% / V 50%: the best way transformers runs each model (issue 6).

    python benchmarks/generate_static.py [--contexts 8192 32768] [--stock-batches 8192:48 32768:12]
        [--batches 8192:64,150 32768:15,38] [--new-tokens 24] [--name generate_static]
    python benchmarks/generate_static.py --prefill [--prefill-chunk 2048] ...   # a real chunked prefill
    python benchmarks/generate_static.py --largest [--fit-prefill] ...   # each model's largest batch at each context
    python benchmarks/generate_static.py --tiny [--prefill] [--largest]   # the whole flow on CPU, a tiny model

Batches are given per context as `CONTEXT:B1,B2` (or `B1,B2`, for every context); `--context` is an alias of
`--contexts`. Out of memory is a result (a row saying so), not a crash.

Random fill (default): each cache is filled with random entries of the context's length (no prefill), then generate()
decodes `--new-tokens` greedy tokens twice: the first call compiles, the second is timed step by step (a logits
processor records the time at every step; the median step is reported).

`--prefill`: a real chunked prefill (`--prefill-chunk` tokens a forward, the last position's logits only) of random
prompt ids of the context's length into the empty static cache, run eagerly as generate() runs it without
compilation, after a warm-up on two chunks; then the two generate() calls above decode from that cache. Reported: the
prefill's seconds and peak memory, then decode as above. Why not generate(prefill_chunk_size=...) with the static
cache: generate() then compiles and CUDA-graphs the prefill chunks too (three graphs: the first chunk, the next ones,
the decode step; counted on the CPU with transformers 5.23, tests/test_prefill.py), and at 8K context, batch 15,
neither model had finished its first call after 270 s on the H100 (transformers 5.17; why was not investigated).
Every chunk attends over the whole static cache, as in transformers' StaticCache. Use contexts that are multiples of
the chunk: a shorter last chunk is one more shape, which the warm-up does not cover.

`--largest`: instead of the batch lists, each model's largest batch at each context, by bisection on a cheap fit test:
a static cache of the timed run's size filled with random entries, then a forward without compilation prefills the
last token (with `--prefill` or `--fit-prefill`: the last chunk, attending over the whole cache as every chunk of a
static cache does) and another decodes one token. That allocates what the timed run allocates, except what
compilation and CUDA graphs add; the timed run at the batch found confirms it, stepping down by 2% (up to 3 times)
where it does not fit. `--fit-prefill` times decode only (random fill) at the batch found.

`--tiny`: a 2-layer, hidden-64 random Llama and its STAR-KV version on the CPU (no compilation), small contexts
(e.g. `--contexts 64 128`), and a simulated memory limit for `--largest`: for smoke tests of the flow only. Results
are then written under `--out` only.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402
from common import environment, with_cache, write_results  # noqa: E402
from generate import LLAMA_31_8B, build_bf16, starkv_model, stock_model  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402

DEVICE = "cuda"
FAKE_MEMORY: int | None = None  # --tiny: the bytes caches may take before a simulated out-of-memory error
TINY = dict(LLAMA_31_8B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384)  # fmt: skip
STOCK = "stock, SDPA, StaticCache, compiled"
OURS = {
    "16": "STAR-KV K30%/V50%, StarKVStaticCache, compiled",
    "4": "STAR-KV K25%/V25% 4-bit, StarKVStaticCache, compiled",
}


def tiny_stock_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def tiny_starkv_model():
    from transformers import LlamaConfig

    from starkv_convert.build import starkv_config
    from starkv_convert.ranks import RankPlan

    layers, heads = TINY["num_hidden_layers"], TINY["num_key_value_heads"]
    plan = RankPlan(k=[[5] * heads for _ in range(layers)], v=[16] * layers)
    quant = {"group": 32, "k_n8": [[0] * heads for _ in range(layers)], "v_n8": [0] * layers}
    config = starkv_config(LlamaConfig(**TINY), plan, torch.bfloat16, quant if generate.FOUR_BIT else None)
    return import_remote("modeling_starkv").StarKVForCausalLM(config).eval()


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """Out of memory, also where it surfaces as another RuntimeError (e.g. in a CUDA graph capture or Triton)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class StepTimes:
    """A logits processor that records the time at every decode step (after a device synchronization)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        synchronize()
        self.times.append(time.perf_counter())
        return scores


def cache_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def static_cache(model, batch: int, tokens: int, slots: int):
    """A static cache of `slots` slots holding `tokens` random entries per sequence."""
    config, g = model.config, torch.Generator(device=DEVICE).manual_seed(0)
    like = dict(device=DEVICE, dtype=model.dtype, generator=g)  # random entries in the model's dtype
    if config.model_type == "starkv":
        cache = import_remote("cache_starkv").StarKVStaticCache(config, slots)
        cache.update_positions(torch.arange(tokens, device=DEVICE)[None], batch)
        for i in range(config.num_hidden_layers):
            if config.kv_quant is not None:  # one sequence's codes and scales, repeated over the batch
                zk = torch.randn(1, tokens, sum(config.kv_k_ranks[i]), **like)
                zv = torch.randn(1, tokens, config.kv_v_ranks[i], **like)
                rows = (c.encode(z) for c, z in zip(model.model.layers[i].self_attn.codecs, (zk, zv)))
                zk, zv = (r.expand(batch, -1, -1) for r in rows)
            else:
                zk = torch.randn(batch, tokens, sum(config.kv_k_ranks[i]), **like)
                zv = torch.randn(batch, tokens, config.kv_v_ranks[i], **like)
            cache.update_latents(zk, zv, i)
    else:
        from transformers import StaticCache

        cache = StaticCache(config=config, max_cache_len=slots)
        for i in range(config.num_hidden_layers):
            k = torch.randn(batch, config.num_key_value_heads, tokens, config.head_dim, **like)
            cache.update(k, torch.randn_like(k), i)
    return cache


def sequence_bytes(model, slots: int) -> int:
    """Bytes of one sequence's static cache of `slots` slots."""
    return cache_bytes(static_cache(model, 1, 1, slots))


def simulate_memory(model, batch: int, slots: int, overhead: float) -> None:
    """--tiny: out of memory where `batch` caches, times `overhead` (compilation's own), exceed FAKE_MEMORY."""
    if FAKE_MEMORY is not None and batch * sequence_bytes(model, slots) * overhead > FAKE_MEMORY:
        raise torch.OutOfMemoryError(f"simulated (--tiny): {batch} sequences of {slots} slots")


def random_ids(batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(1, 1000, (batch, tokens), device=DEVICE)  # no pad token (0): nothing is masked as padding


def generate_kwargs(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def decode_gaps_ms(steps: StepTimes) -> float:
    gaps = [b - a for a, b in zip(steps.times[1:], steps.times[2:])]  # decode steps only
    return statistics.median(gaps) * 1e3


def slots_needed(context: int, new_tokens: int) -> int:
    """Cache slots of a timed run: the context, then two generate() calls of `new_tokens` (and the prefill's token)."""
    return context + 2 * new_tokens + 2


def timed_decode(model, cache, ids: torch.Tensor, new_tokens: int) -> dict:
    """Two generate() calls from `cache` (holding all but the last of `ids`): one compiles, one is timed by step."""
    kwargs = generate_kwargs(new_tokens)
    reset_peak()
    start = time.perf_counter()
    ids = model.generate(ids, **with_cache(cache), **kwargs)  # compiles the decode step
    compile_s = time.perf_counter() - start
    steps = StepTimes()
    model.generate(ids, **with_cache(cache), logits_processor=[steps], **kwargs)
    ms = decode_gaps_ms(steps)
    return {"ms_per_step": ms, "tokens_per_s": len(ids) / ms * 1e3, "peak_GB": peak_gb(), "first_call_s": compile_s}


@torch.no_grad()
def decode(model, batch: int, tokens: int, new_tokens: int) -> dict:
    """Median ms per compiled decode step of generate() at `batch` and `tokens` of random context; peak memory."""
    cache = static_cache(model, batch, tokens, slots_needed(tokens, new_tokens))
    return timed_decode(model, cache, random_ids(batch, tokens + 1), new_tokens)


def chunked_prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Forwards `ids` chunk by chunk into the empty `cache`, computing the last position's logits only; returns them."""
    for begin in range(0, ids.shape[1], chunk):
        piece = ids[:, begin : begin + chunk]
        positions = torch.arange(begin, begin + piece.shape[1], device=DEVICE).expand(len(ids), -1)
        logits = model(input_ids=piece, **with_cache(cache), position_ids=positions, logits_to_keep=1).logits
    return logits[:, -1]


@torch.no_grad()
def prefill_decode(model, batch: int, context: int, new_tokens: int, chunk: int) -> dict:
    """A chunked prefill of `context` random tokens (eager), then compiled decode: seconds, ms/step, peak memory."""
    cache = static_cache(model, batch, 1, slots_needed(context, new_tokens))
    ids = random_ids(batch, context)
    cache.reset()
    chunked_prefill(model, cache, ids[:, : min(context, 2 * chunk)], chunk)  # warm-up: kernels, allocator
    cache.reset()
    free_memory()
    reset_peak()
    synchronize()
    start = time.perf_counter()
    first = chunked_prefill(model, cache, ids, chunk).argmax(-1, keepdim=True)
    synchronize()
    prefill_s = time.perf_counter() - start
    row = {"prefill_s": prefill_s, "prefill_tokens_per_s": batch * context / prefill_s, "prefill_peak_GB": peak_gb()}
    return row | timed_decode(model, cache, torch.cat([ids, first], dim=1), new_tokens)  # peak_GB: the decode's


@torch.no_grad()
def fits(model, batch: int, context: int, new_tokens: int, chunk: int | None) -> bool:
    """
    The cheap fit test of --largest: the timed run's cache, filled with random entries but for the last token (or
    prefill chunk), which one forward without compilation prefills; a second forward decodes a token. (Forwards,
    not generate(): transformers 5.17's chunked prefill restarts from position 0 over a cache that holds tokens.)
    """
    prefill = chunk is not None
    cache = None
    try:
        last, slots = min(chunk, context - 1) if prefill else 1, slots_needed(context, new_tokens)
        simulate_memory(model, batch, slots, 1.0)
        cache = static_cache(model, batch, context - last, slots)
        ids = random_ids(batch, last)
        positions = torch.arange(context - last, context + 1, device=DEVICE).expand(batch, -1)
        for step in (slice(0, last), slice(last, last + 1)):
            logits = model(input_ids=ids, **with_cache(cache), position_ids=positions[:, step], logits_to_keep=1).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)
        synchronize()
        return True
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        return False
    finally:
        cache = None
        free_memory()


def largest_batch(model, name: str, context: int, new_tokens: int, chunk: int | None) -> int:
    """The largest batch that passes `fits`, by bisection below the batch whose cache alone fills the memory."""
    per_sequence = sequence_bytes(model, slots_needed(context, new_tokens))
    free_memory()
    available = FAKE_MEMORY if FAKE_MEMORY is not None else torch.cuda.mem_get_info()[0]
    low, high = 0, available // per_sequence + 1
    print(f"{name}, context {context}: {per_sequence / 1e6:.4g} MB of cache per sequence, bisection in 1..{high}",
          flush=True)  # fmt: skip
    while low < high:
        mid = (low + high + 1) // 2
        start = time.perf_counter()
        ok = fits(model, mid, context, new_tokens, chunk)
        print(f"  batch {mid}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - start:.1f} s)", flush=True)
        low, high = (mid, high) if ok else (low, mid - 1)
    return low


def run(model, batch: int, context: int, args) -> dict:
    """The timed row of `batch` at `context` (out of memory is a result); compiled state is dropped after it."""
    row = {}
    try:
        simulate_memory(model, batch, slots_needed(context, args.new_tokens), 1.03)
        if args.prefill:
            row.update(prefill_decode(model, batch, context, args.new_tokens, args.prefill_chunk))
        else:
            row.update(decode(model, batch, context, args.new_tokens))
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        row["out_of_memory"] = True
    free_memory()
    torch._dynamo.reset()  # a fresh compilation per shape, as a new process would make
    return row


def measure(name: str, build, batches: dict[int, list[int]], args) -> list[dict]:
    if not args.largest and not any(batches.get(context) for context in args.contexts):
        return []
    model = build_bf16(build)
    rows = []
    for context in args.contexts:
        if args.largest:
            chunk = args.prefill_chunk if args.prefill or args.fit_prefill else None
            found = largest_batch(model, name, context, args.new_tokens, chunk)
            todo = [found] if found else []
        else:
            todo = batches.get(context, [])
        for batch in todo:
            print(f"{name}, context {context}, batch {batch}: timing", flush=True)
            row = {"model": name, "context": context, "batch": batch}
            row.update(run(model, batch, context, args))
            if args.largest:  # step down where compilation (CUDA graphs) needs more than the fit test saw
                failed = []
                while row.get("out_of_memory") and batch > 1 and len(failed) < 3:
                    failed.append(batch)
                    batch -= max(1, batch // 50)
                    print(f"{name}, context {context}: out of memory when timed, retrying at batch {batch}", flush=True)
                    row = {"model": name, "context": context, "batch": batch}
                    row.update(run(model, batch, context, args))
                row.update(largest_fit_test=found, out_of_memory_when_timed_at=failed)
            print(row, flush=True)
            rows.append(row)
    model = None
    free_memory()
    return rows


def per_context(specs: list[str], contexts: list[int]) -> dict[int, list[int]]:
    """`CONTEXT:B1,B2` (one context) or `B1,B2` (every context) -> {context: batches}."""
    table: dict[int, list[int]] = {}
    for spec in specs:
        context, _, batches = spec.rpartition(":")
        for c in [int(context)] if context else contexts:
            table.setdefault(c, []).extend(int(b) for b in batches.split(",") if b)
    return table


def print_table(rows: list[dict]) -> None:
    prefill = any("prefill_s" in r for r in rows)
    extra = f" {'prefill s':>9s}" if prefill else ""
    print(f"{'model':48s} {'context':>7s} {'batch':>5s}{extra} {'ms/step':>8s} {'tok/s':>7s} {'peak GB':>8s}")
    for r in rows:
        head = f"{r['model']:48s} {r['context']:7d} {r['batch']:5d}"
        if r.get("out_of_memory"):
            print(f"{head} out of memory")
            continue
        extra = f" {r['prefill_s']:9.2f}" if prefill else ""
        peak = f"{r['peak_GB']:8.1f}" if r["peak_GB"] is not None else f"{'-':>8s}"
        print(f"{head}{extra} {r['ms_per_step']:8.1f} {r['tokens_per_s']:7.1f} {peak}")


def main(argv: list[str] | None = None) -> list[dict]:
    global DEVICE, FAKE_MEMORY
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", "--context", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--stock-batches", nargs="*", default=["8192:48", "32768:12"], help="CONTEXT:B1,B2 or B1,B2")
    p.add_argument("--batches", nargs="*", default=["8192:64,150", "32768:15,38"], help="STAR-KV's, as above")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--prefill", action="store_true", help="a real chunked prefill instead of random cache entries")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--largest", action="store_true", help="each model's largest batch instead of the batch lists")
    p.add_argument("--fit-prefill", action="store_true", help="--largest: a prefill chunk in the fit test, untimed")
    p.add_argument("--models", nargs="+", choices=["stock", "starkv"], default=["stock", "starkv"])
    p.add_argument("--kv-bits", choices=sorted(generate.SETTINGS), default="16",
                   help="16: K 30%% / V 50%% bf16 latents; 4: K 25%% / V 25%% latents in 4 bits")  # fmt: skip
    p.add_argument("--name", help="results name (default generate_static or, --prefill, generate_prefill; +_largest)")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiny-memory", type=int, default=600_000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    generate.K_RANK, generate.V_RANK, generate.FOUR_BIT = generate.SETTINGS[args.kv_bits]
    if args.tiny:
        DEVICE, FAKE_MEMORY = "cpu", args.tiny_memory
        builds = (tiny_stock_model, tiny_starkv_model)
    else:
        builds = (stock_model, starkv_model)
    rows = []
    if "stock" in args.models:
        rows += measure(STOCK, builds[0], per_context(args.stock_batches, args.contexts), args)
    if "starkv" in args.models:
        rows += measure(OURS[args.kv_bits], builds[1], per_context(args.batches, args.contexts), args)

    name = args.name or ("generate_prefill" if args.prefill else "generate_static") + ("_largest" * args.largest)
    env = {"device": "cpu (--tiny)", "torch": torch.__version__} if args.tiny else environment()
    result = {
        "benchmark": name,
        **env,
        "kv_bits": args.kv_bits,
        "contexts": args.contexts,
        "new_tokens": args.new_tokens,
    }
    chunk = args.prefill_chunk if args.prefill or (args.largest and args.fit_prefill) else None
    result.update(largest=args.largest, fit_prefill=args.largest and chunk is not None, prefill_chunk=chunk, rows=rows)
    if args.tiny:  # never over the real results
        if args.out:
            (Path(args.out) / f"{name}_tiny.json").write_text(json.dumps(result, indent=1))
    else:
        print(f"wrote {write_results(name, result, args.out)}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
