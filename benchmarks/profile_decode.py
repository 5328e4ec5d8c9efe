"""
Where the decode kernel's time goes: per-kernel CUDA times (torch.profiler) and a sweep of launch settings on a few
ANCHORS shapes. A development tool; decode_attention.py records the results that count.

    python benchmarks/profile_decode.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


VARIANTS = {  # all with RoPE tables, as the model runs it; the "scores" column is the one to compare
    "tables (default launch)": {"rope_table": True},
    "3 stages": {"rope_table": True, "scores_stages_tables": 3},
    "4 stages": {"rope_table": True, "scores_stages_tables": 4},
    "8 warps": {"rope_table": True, "scores_warps": 8},
    "8 warps, 3 stages": {"rope_table": True, "scores_warps": 8, "scores_stages_tables": 3},
    "BT 32, 3 stages": {"rope_table": True, "block_tokens": 32, "scores_stages_tables": 3},
    "scores 4 programs/SM": {"rope_table": True, "scores_programs_per_sm": 4},
    "values 8 programs/SM": {"rope_table": True, "values_programs_per_sm": 8},
    "values block 128": {"rope_table": True, "value_block": 128},
}


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for index in (7, 3, 4):
        name, heads, kv_heads, batch, tokens = ROWS[index]
        inputs = latent_inputs(kv_heads, batch, tokens, g)
        query = torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16)
        print(f"\n== {name} B={batch} T={tokens}: ms per call (total of all kernels | scores | values | merge)")
        for label, config in VARIANTS.items():
            try:
                times = dict((k.strip(), ms) for k, ms in profile(query, inputs, config))
            except Exception as e:  # e.g. out of resources for a large tile
                print(f"  {label:24s} failed: {type(e).__name__}: {str(e)[:100]}")
                continue
            print(
                f"  {label:24s} {sum(times.values()):7.3f} | {times.get('_scores_kernel', 0):7.3f} | "
                f"{times.get('_values_kernel', 0):7.3f} | {times.get('_merge_kernel', 0):7.3f}"
            )
        inputs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
