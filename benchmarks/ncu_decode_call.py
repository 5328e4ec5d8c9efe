"""
One decode-kernel call pattern to profile with Nsight Compute (the hardware counters `benchmarks/results/ncu_*.txt`
quote): a row of decode_attention.py (default 7: GQA 8B, batch 16, 32K), bf16 or 4-bit latents, called 3 times.

    ncu --clock-control none -k regex:"_scores_kernel|_values_kernel" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \\
        python benchmarks/ncu_decode_call.py --bits 4 [--config heads_per_program=2 ...]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention as bench  # noqa: E402
from common import launch_settings  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", choices=sorted(bench.SETTINGS), default="4")
    p.add_argument("--row", type=int, default=7, help="index into decode_attention.ROWS")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--config", action="append", default=[], metavar="KEY=JSON", help="a launch setting (repeatable)")
    args = p.parse_args()
    config = launch_settings(p, args.config)
    kernels = import_remote("latent_decode")
    bench.K_RANK, bench.V_PER_HEAD, bench.EIGHT_BIT = bench.SETTINGS[args.bits]
    name, heads, kv_heads, batch, tokens = bench.ROWS[args.row]
    inputs = bench.latent_inputs(kv_heads, batch, tokens, torch.Generator(device="cuda").manual_seed(0))
    if bench.EIGHT_BIT is not None:
        inputs = bench.quantize_inputs(inputs)
    tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, torch.bfloat16)
    query = torch.randn(batch, heads, bench.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        kernels.latent_decode_attention(query, **inputs, tables=tables, config=config)
    torch.cuda.synchronize()
    print(f"{args.calls} calls: {name} B={batch} T={tokens}, {args.bits}-bit latents, settings {config}")


if __name__ == "__main__":
    main()
