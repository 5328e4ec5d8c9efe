"""
Device-side timeline of one decode call replayed from a CUDA graph on cold inputs, STAR-KV kernel and SDPA: each
kernel's duration and the gaps between them (torch.profiler over graph replays, one replay after each short sleep
kernel). Shows where a batch-1 call's time goes besides the kernels themselves. A development tool.

    PYTHONPATH=. python benchmarks/graph_timeline.py [ROW ...]   # indices of decode_attention.ROWS (default 4 0)
    PYTHONPATH=. python benchmarks/graph_timeline.py 4 --config heads_per_program=2   # also STAR-KV with these settings
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import captured_graphs, launch_settings  # noqa: E402
from decode_attention import HEAD_DIM, ROWS, latent_inputs  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402

kernels = import_remote("latent_decode")
COPIES = 6  # inputs cycled through, so that nothing stays in L2


def replay_kernels(graphs: list, replays: int = 24) -> list[list[dict]]:
    """The kernels of each replay (chrome-trace events), each replay after a 0.1 ms sleep kernel, which comes first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(replays):
            torch.cuda._sleep(200_000)
            graphs[i % len(graphs)].replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    runs: list[list[dict]] = []
    for event in sorted(events, key=lambda e: e["ts"]):
        if "sleep" in event["name"].lower() or "spin" in event["name"].lower():
            runs.append([event])
        elif runs:
            runs[-1].append(event)
    return [run for run in runs if len(run) > 1]


def describe(run: list[dict]) -> str:
    """A replay's span and, kernel by kernel, the gap before it and its duration (us)."""
    sleep, kernels_run = run[0], run[1:]
    start = kernels_run[0]["ts"]
    parts, end = [f"(first kernel {start - sleep['ts'] - sleep['dur']:.1f} after the sleep)"], start
    for event in kernels_run:
        parts.append(f"[gap {event['ts'] - end:.1f}] {event['name'][:32]} {event['dur']:.1f}")
        end = event["ts"] + event["dur"]
    return f"span {end - start:.1f} us: " + "; ".join(parts)


def row_calls(index: int, g: torch.Generator, config: dict) -> dict[str, list]:
    """COPIES calls on different inputs of a row, for the STAR-KV kernel (also with `config`, if any) and for SDPA on
    the full cache."""
    name, heads, kv_heads, batch, tokens = ROWS[index]
    latents = [latent_inputs(kv_heads, batch, tokens, g) for _ in range(COPIES)]
    tables = [kernels.rope_tables(x["positions"], x["inv_freq"], 1.0, torch.bfloat16) for x in latents]
    query = torch.randn(batch, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    shape = (batch, kv_heads, tokens, HEAD_DIM)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    caches = [(torch.randn(shape, **bf16), torch.randn(shape, **bf16)) for _ in range(COPIES)]
    gqa = kv_heads != heads
    settings = {"STAR-KV": {}} | ({f"STAR-KV {config}": config} if config else {})
    return {
        label: [
            lambda x=x, t=t, c=c: kernels.latent_decode_attention(query, **x, tables=t, config=c)
            for x, t in zip(latents, tables)
        ]
        for label, c in settings.items()
    } | {
        "SDPA": [
            lambda k=k, v=v: F.scaled_dot_product_attention(query[:, :, None], k, v, enable_gqa=gqa) for k, v in caches
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rows", type=int, nargs="*", default=[4, 0], help="indices of decode_attention.ROWS")
    p.add_argument("--config", action="append", default=[], metavar="KEY=JSON", help="a launch setting to time as "
                   "well (repeat the option for several)")  # fmt: skip
    args = p.parse_args()
    config = launch_settings(p, args.config)
    g = torch.Generator(device="cuda").manual_seed(0)
    for index in args.rows:
        name, _, _, batch, tokens = ROWS[index]
        for label, calls in row_calls(index, g, config).items():
            runs = replay_kernels(captured_graphs(calls))
            print(f"\n== {name} B={batch} T={tokens} {label}: {len(runs)} replays, the last three")
            for run in runs[-3:]:
                print("  " + describe(run))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
