"""
Where a whole decode step's GPU time goes: the Llama-3.1-8B-shaped model (random bf16 weights, stock or STAR-KV
K 30% / V 50%) with a static cache of `--context` random entries, one eager forward per step under torch.profiler,
kernel times per step by kernel name. A development tool (printed, not recorded); generate_static.py times the
compiled step that counts.

    python benchmarks/profile_step.py [--model starkv|stock] [--batch 34] [--context 32768] [--top 20]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import with_cache  # noqa: E402
from generate import build_bf16, starkv_model, stock_model  # noqa: E402
from generate_static import static_cache  # noqa: E402


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["starkv", "stock"], default="starkv")
    p.add_argument("--batch", type=int, default=34)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    model = build_bf16(starkv_model if args.model == "starkv" else stock_model)
    cache = static_cache(model, args.batch, args.context, args.context + 3 + 2 * args.steps)  # every step's slot
    ids = torch.randint(1, 1000, (args.batch, 1), device="cuda")
    position = [args.context]

    def step() -> None:
        positions = torch.full((args.batch, 1), position[0], device="cuda")
        model(input_ids=ids, **with_cache(cache), position_ids=positions, logits_to_keep=1)
        position[0] += 1

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"{args.model}, batch {args.batch}, context {args.context}: eager step "
          f"{(time.perf_counter() - start) / args.steps * 1e3:.1f} ms")  # fmt: skip

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / args.steps / 1e3
    print(f"GPU kernel time per step: {total:.1f} ms")
    for e in sorted(events, key=lambda e: -e.device_time_total)[: args.top]:
        print(f"{e.device_time_total / args.steps / 1e3:8.2f} ms {e.count // args.steps:5d}x  {e.key[:100]}")


if __name__ == "__main__":
    main()
