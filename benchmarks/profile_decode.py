"""
Where the decode kernel's time goes: per-kernel CUDA times (torch.profiler) and a sweep of launch settings on a few
ANCHORS shapes, with the RoPE tables passed in as the model does. A development tool; decode_attention.py records
the results that count.

    python benchmarks/profile_decode.py [--rows 7 3] [--quick] [--valid] [--kv-bits 4] [--out results/NAME.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention  # noqa: E402
from common import environment  # noqa: E402
from decode_attention import ROWS, latent_inputs, quantize_inputs  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402

kernels = import_remote("latent_decode")
KERNELS = ("_scores_kernel", "_values_kernel", "_merge_kernel")


REFERENCE: dict = {}  # the default settings' output of the present row


def profile(query, inputs, tables, config) -> tuple[dict[str, float], float]:
    """Per-kernel CUDA ms of one call with these settings, and the output's relative difference from the default's."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if "rope_table" in config and config["rope_table"] is None:  # no tables: RoPE by angle addition
        tables, config = None, {k: v for k, v in config.items() if k != "rope_table"}
    if "_tables" in config:  # the RoPE tables in another dtype than rope_tables gives (e.g. "bfloat16")
        tables = tuple(t.to(getattr(torch, config["_tables"])) for t in tables)
        config = {k: v for k, v in config.items() if k != "_tables"}

    out = kernels.latent_decode_attention(query, **inputs, config=config, tables=tables).float()
    if "out" in REFERENCE:  # relative difference from the default settings' output
        error = ((out - REFERENCE["out"]).norm() / REFERENCE["out"].norm()).item()
    else:
        REFERENCE["out"], error = out, 0.0
    for _ in range(2):
        kernels.latent_decode_attention(query, **inputs, config=config, tables=tables)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            kernels.latent_decode_attention(query, **inputs, config=config, tables=tables)
        torch.cuda.synchronize()
    times = {e.key.strip(): e.device_time_total / 10 / 1000 for e in prof.key_averages() if e.device_time_total > 0}
    return times, error


VARIANTS = {  # the "scores" column compares the scores pass, "values" the values passes
    "default": {},
    "scores 2 stages": {"scores_stages_tables": 2},
    "values 2 stages": {"values_stages": 2},
    "scores 16 programs/SM": {"scores_programs_per_sm": 16},
    "values 8 programs/SM": {"values_programs_per_sm": 8},
    "scores 2 warps": {"scores_warps": 2},
    "scores 2 warps, 16 programs/SM": {"scores_warps": 2, "scores_programs_per_sm": 16},
    "scores 8 warps": {"scores_warps": 8},
    "scores 8 warps, 2 stages": {"scores_warps": 8, "scores_stages_tables": 2},
    "scores 8 warps, 4 programs/SM": {"scores_warps": 8, "scores_programs_per_sm": 4},
    "scores 8 warps, tiles of 128 tokens": {"scores_warps": 8, "block_tokens": 128},
    "scores 4 stages": {"scores_stages_tables": 4},
    "scores token-major": {"token_major_scores": True},
    "values block 128": {"value_block": 128},
    "values block 128, 8 warps": {"value_block": 128, "values_warps": 8},
    "values block 32": {"value_block": 32},
    "keys dequantized per value": {"grouped_keys": False},  # (quantized latents only)
    "values dequantized per value": {"grouped_values": False},
    "scores buffer fp32": {"half_scores": False},
    "scores buffer fp16": {"half_scores": True},
    "scores 2 KV heads a program": {"heads_per_program": 2},
    "scores 4 KV heads a program": {"heads_per_program": 4},
    "no RoPE tables (angle addition)": {"rope_table": None},
    "tiles of 32 tokens": {"block_tokens": 32},
    "tiles of 128 tokens": {"block_tokens": 128},
    "values block 64": {"value_block": 64},
    "values block 128, 2 programs/SM": {"value_block": 128, "values_programs_per_sm": 2},
    "values block 128, 8 programs/SM": {"value_block": 128, "values_programs_per_sm": 8},
    "values block 256": {"value_block": 256},
    "scores bf16 tables": {"_tables": "bfloat16"},  # (rope_tables gives fp16 tables for 16-bit models)
    "scores split halves": {"joined_halves": False},  # (each RoPE half rebuilt and scored by its own products)
    "scores one rank chunk": {"rank_pad": 0},  # (78 KB shared: 2 programs/SM)
    "scores without whole waves": {"scores_resident": 0},  # (the split count as chosen before session 14)
    "scores TMA": {"scores_tma": True},  # (latents and RoPE tables by TMA descriptors, 124-128 registers)
    "scores TMA, 2 stages": {"scores_tma": True, "scores_stages_tables": 2},  # (48 KB shared: 4 programs/SM)
    "scores TMA, 4 stages": {"scores_tma": True, "scores_stages_tables": 4},
    "scores TMA, 2 KV heads a program": {"scores_tma": True, "heads_per_program": 2},
    "values TMA": {"values_tma": True},  # (scores and value latents by TMA descriptors)
    "values pairs apart": {"values_pairs_apart": True},  # (quantized: even and odd channels in products of their own;
    # the default where G = 1)
    "values pairs together": {"values_pairs_apart": False},
    "values block 256, pairs apart": {"value_block": 256, "values_pairs_apart": True},
    "values block 128, 8 warps, pairs apart": {"value_block": 128, "values_warps": 8, "values_pairs_apart": True},
    "values scales not prefetched": {"values_prefetch": False},  # (quantized values by group)
    "scores key scales as words": {"key_scale_words": True},  # (quantized keys, unfolded: G > 1)
    "values scales as words": {"value_scale_words": True, "values_prefetch": False},  # (rows 4-byte aligned)
    "values scales as words, prefetched": {"value_scale_words": True},
    # G = 1: the query folded into the up-projection, the RoPE tables times that on the tensor cores (the default
    # for quantized keys only: with 16-bit latents "default" and "unfolded" are the same pass)
    "scores unfolded": {"folded_scores": False},  # (keys rebuilt, rotated and scored, as for G > 1)
    "scores unfolded, TMA": {"folded_scores": False, "scores_tma": True},
    "scores folded, TMA": {"scores_tma": True},
    "scores folded, pointer loads": {"scores_tma": False},
    "scores folded, 2 stages": {"scores_stages_tables": 2},  # (48 KB shared: 4 programs/SM)
    "scores folded, TMA, 2 stages": {"scores_tma": True, "scores_stages_tables": 2},
    "scores folded, 4 stages": {"scores_stages_tables": 4},
    "scores folded, 2 stages, 4 resident": {"scores_stages_tables": 2, "scores_resident": 4},
    "scores and values TMA": {"scores_tma": True, "values_tma": True},
    # the folded pass forced on (for 16-bit latents it is off by default)
    "scores folded on": {"folded_scores": True},
    "scores folded on, one rank chunk": {"folded_scores": True, "rank_pad": 0},  # (2 products of N = 64 a tile)
    "scores folded on, one rank chunk, 2 stages, 4 resident": {
        "folded_scores": True,
        "rank_pad": 0,
        "scores_stages_tables": 2,
        "scores_resident": 4,
    },
    "scores folded on, one rank chunk, 4 stages": {"folded_scores": True, "rank_pad": 0, "scores_stages_tables": 4},
    # the folded pass of quantized keys (default: scale groups' even and odd channels joined, two heads' paired)
    "scores groups apart": {"joined_groups": False},  # (the default before session 20: 4 products a head a tile)
    "scores joined groups, heads unpaired": {"paired_heads": False},
    "scores 1 KV head a program": {"heads_per_program": 1},  # (the folded pass of quantized keys takes 2 by default)
    # (tables read once; two heads' products a tile as one unless unpaired)
    "scores folded on, 2 KV heads a program": {"folded_scores": True, "heads_per_program": 2},
    "scores folded on, 2 KV heads a program, unpaired": {
        "folded_scores": True,
        "heads_per_program": 2,
        "paired_heads": False,
    },
    "scores folded on, 4 KV heads a program": {"folded_scores": True, "heads_per_program": 4},
    "scores folded on, 2 KV heads a program, one rank chunk": {
        "folded_scores": True,
        "heads_per_program": 2,
        "rank_pad": 0,
    },
    "scores folded on, 2 KV heads a program, 2 stages": {
        "folded_scores": True,
        "heads_per_program": 2,
        "scores_stages_tables": 2,
    },
}
VALUES = {k: VARIANTS[k] for k in VARIANTS if k == "default" or k.startswith("values")}
QUICK = {k: VARIANTS[k] for k in ("default", "keys dequantized per value")}


def report_registers() -> list[str]:
    """Registers and spills of every compiled variant (Triton's compiled-kernel metadata), where available."""
    lines = []
    for name in KERNELS:
        fn = getattr(kernels, name)
        try:
            for cache in fn.device_caches.values():
                for compiled in cache[0].values():
                    lines.append(f"{name}: {compiled.n_regs} registers, {compiled.n_spills} spills")
        except Exception as e:  # the attribute layout changes between triton versions
            lines.append(f"{name}: registers not available ({type(e).__name__})")
    for line in lines:
        print(f"  {line}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="*", default=[7, 3])
    p.add_argument("--quick", action="store_true", help="only the default and per-value key dequantization")
    p.add_argument("--values", action="store_true", help="only the default and the values-pass variants")
    p.add_argument("--shared-tables", action="store_true", help="one RoPE table for all sequences (batch stride 0)")
    p.add_argument("--only", nargs="*", help="only the variants whose names contain one of these (and the default)")
    p.add_argument("--kv-bits", choices=sorted(decode_attention.SETTINGS), default="16")
    p.add_argument("--valid", action="store_true", help="a validity mask as the model passes (3 padding tokens)")
    p.add_argument("--out", help="also write every number to this JSON file (with device, versions and commit)")
    args = p.parse_args()
    record = {"benchmark": "profile_decode", **environment(), "argv": sys.argv[1:], "rows": []}
    decode_attention.K_RANK, decode_attention.V_PER_HEAD, decode_attention.EIGHT_BIT = decode_attention.SETTINGS[
        args.kv_bits
    ]
    g = torch.Generator(device="cuda").manual_seed(0)
    for index in args.rows:
        name, heads, kv_heads, batch, tokens = ROWS[index]
        inputs = latent_inputs(kv_heads, batch, tokens, g)
        if args.valid:
            inputs["valid"] = torch.ones(batch, tokens, dtype=torch.bool, device="cuda")
            inputs["valid"][:, :3] = False
        if decode_attention.EIGHT_BIT is not None:
            inputs = quantize_inputs(inputs)
        tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, torch.bfloat16)
        if args.shared_tables:  # one table for every sequence (batch stride 0)
            tables = tuple(t[:1].expand_as(t) for t in tables)
        query = torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16)
        variants = QUICK if args.quick else VALUES if args.values else VARIANTS
        if args.only:
            variants = {k: v for k, v in variants.items() if k == "default" or any(o in k for o in args.only)}
        print(f"\n== {name} B={batch} T={tokens}: ms per call (all kernels | scores | values | merge)")
        row = {"shape": name, "batch": batch, "context": tokens, "kv_bits": args.kv_bits, "variants": {}}
        record["rows"].append(row)
        for label, config in variants.items():
            try:
                times, error = profile(query, inputs, tables, config)
            except Exception as e:  # e.g. out of resources for a large tile
                print(f"  {label:38s} failed: {type(e).__name__}: {str(e)[:100]}")
                row["variants"][label] = {"config": config, "failed": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            row["variants"][label] = {"config": config, "ms": times, "relative_difference": error}
            print(
                f"  {label:38s} {sum(times.values()):7.3f} | "
                + " | ".join(f"{times.get(k, 0):6.3f}" for k in KERNELS)
                + f" | diff {error:.1e}"
            )
        inputs = tables = None
        REFERENCE.clear()
        torch.cuda.empty_cache()
    record["registers"] = report_registers()
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
