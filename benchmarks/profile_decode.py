"""
Where the decode kernel's time goes: per-kernel CUDA times (torch.profiler) and a sweep of launch settings on a few
ANCHORS shapes. A development tool; decode_attention.py records the results that count.

    python benchmarks/profile_decode.py
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms  # noqa: E402
from decode_attention import ROWS, latent_inputs  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402

kernels = import_remote("latent_decode")


def profile(query, inputs, config) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        kernels.latent_decode_attention(query, **inputs, config=config)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            kernels.latent_decode_attention(query, **inputs, config=config)
        torch.cuda.synchronize()
    rows = [(e.key[:60], e.device_time_total / 10 / 1000) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    sweep = {
        "block_tokens": [32, 64, 128],
        "scores_warps": [4, 8],
        "values_warps": [4],
        "value_block": [64, 128],
    }
    for index in (4, 7, 3):
        name, heads, kv_heads, batch, tokens = ROWS[index]
        inputs = latent_inputs(kv_heads, batch, tokens, g)
        query = torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16)
        print(f"\n== {name} B={batch} T={tokens}: kernel times with the default config (ms)")
        for kernel, ms in profile(query, inputs, None):
            print(f"  {ms:8.3f}  {kernel}")
        results = []
        for values in itertools.product(*sweep.values()):
            config = dict(zip(sweep, values))
            try:
                ms = median_ms(
                    lambda q=query, i=inputs, c=config: kernels.latent_decode_attention(q, **i, config=c), rep=50
                )
            except Exception as e:  # e.g. out of shared memory for a large tile
                print(f"  {config}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            results.append((ms, config))
        results.sort(key=lambda r: r[0])
        for ms, config in results[:6]:
            print(f"  {ms:8.3f} ms  {config}")
        best = results[0][1]
        print("  best config kernel times:")
        for kernel, ms in profile(query, inputs, best):
            print(f"  {ms:8.3f}  {kernel}")
        inputs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
