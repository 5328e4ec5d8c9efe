"""
Decode attention on an H100: PyTorch SDPA over the full bf16 cache against the STAR-KV latent kernel, on the eight
shapes of ../shared/ANCHORS.md (K keeps 38 of 128 per KV head, V keeps half of num_kv_heads * head_dim jointly).

    python benchmarks/decode_attention.py [--out DIR]
    python benchmarks/decode_attention.py --kv-bits 4   # K 32 / V a quarter, latents in 4 bits (the ~16x setting)
    python benchmarks/decode_attention.py --config scores_stages_tables=2   # launch settings (DEFAULT_CONFIG keys)

Times are medians of triton.testing.do_bench in ms; floors are the bytes that must be read once over the measured
copy bandwidth. Inputs rotate over enough copies that the timed data never sits in L2.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, launch_settings, rotating_ms, write_results  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402

ROWS = [  # name, query heads, KV heads, batch, context
    ("MHA 7B", 32, 32, 1, 16384),
    ("MHA 7B", 32, 32, 1, 65536),
    ("MHA 7B", 32, 32, 8, 16384),
    ("MHA 7B", 32, 32, 16, 32768),
    ("GQA 8B", 32, 8, 1, 16384),
    ("GQA 8B", 32, 8, 1, 65536),
    ("GQA 8B", 32, 8, 8, 16384),
    ("GQA 8B", 32, 8, 16, 32768),
]
HEAD_DIM = 128
SETTINGS = {  # --kv-bits: key rank per KV head, value rank per KV head, 8-bit share (None: bf16 latents)
    "16": (38, HEAD_DIM // 2, None),  # ANCHORS.md: K 30%, V 50%
    "4": (32, HEAD_DIM // 4, 0.0),  # K 25%, V 25%, every channel in 4 bits
}
K_RANK, V_PER_HEAD, EIGHT_BIT = SETTINGS["16"]
CONFIG: dict = {}  # --config: launch settings for latent_decode_attention
LAYERS = 32  # both shapes have 32 layers: the per-step RoPE tables are charged 1/32 to each layer's attention
L2_BYTES = 50 << 20


def copies_for(nbytes: int) -> int:
    return max(1, min(8, -(-4 * L2_BYTES // nbytes)))


def latent_inputs(kv_heads: int, batch: int, tokens: int, generator: torch.Generator):
    d, dev = HEAD_DIM, "cuda"
    k_ranks = [K_RANK] * kv_heads
    v_rank = kv_heads * V_PER_HEAD
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    return dict(
        key_latents=torch.randn(batch, tokens, sum(k_ranks), generator=generator, **bf16),
        value_latents=torch.randn(batch, tokens, v_rank, generator=generator, **bf16),
        positions=torch.arange(tokens, device=dev, dtype=torch.int32).expand(batch, -1).contiguous(),
        valid=None,
        k_up_weight=torch.randn(d, sum(k_ranks), generator=generator, **bf16) / K_RANK**0.5,
        k_ranks=k_ranks,
        k_bias=None,
        k_norm=None,
        inv_freq=1.0 / (500000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)),
        rope_scale=1.0,
        v_up_weight=torch.randn(kv_heads * d, v_rank, generator=generator, **bf16) / v_rank**0.5,
        v_bias=None,
        scaling=d**-0.5,
    )


def latent_codecs(k_ranks: list[int], v_rank: int) -> tuple:
    """The (key, value) codecs of the quantized setting: EIGHT_BIT share of channels in 8 bits, default row layout."""
    quant = import_remote("latent_quant")
    return (
        quant.LatentCodec(k_ranks, [round(EIGHT_BIT * r) for r in k_ranks], 32),
        quant.LatentCodec([v_rank], [round(EIGHT_BIT * v_rank)], 32),
    )


def quantize_inputs(inputs: dict) -> dict:
    """The inputs with their latents stored as the codecs' uint8 rows."""
    codecs = latent_codecs(inputs["k_ranks"], inputs["value_latents"].shape[-1])
    rows = [c.encode(inputs[n]) for c, n in zip(codecs, ("key_latents", "value_latents"))]
    return dict(inputs, key_latents=rows[0], value_latents=rows[1], codecs=codecs)


def run_row(kernels, name, heads, kv_heads, batch, tokens, bandwidth) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    d = HEAD_DIM
    full_bytes = 2 * batch * kv_heads * tokens * d * 2
    latent_values = kv_heads * K_RANK + kv_heads * V_PER_HEAD
    latent_bytes = batch * tokens * latent_values * 2
    if EIGHT_BIT is not None:  # the rows as cached (codes, scales and any alignment padding)
        per_token = sum(codec.bytes_per_token for codec in latent_codecs([K_RANK] * kv_heads, kv_heads * V_PER_HEAD))
        latent_bytes = batch * tokens * per_token

    query = torch.randn(batch, heads, d, generator=g, device="cuda", dtype=torch.bfloat16)
    caches = [
        (torch.randn(batch, kv_heads, tokens, d, generator=g, device="cuda", dtype=torch.bfloat16),
         torch.randn(batch, kv_heads, tokens, d, generator=g, device="cuda", dtype=torch.bfloat16))
        for _ in range(copies_for(full_bytes))
    ]  # fmt: skip
    gqa = kv_heads != heads
    sdpa_calls = [
        lambda k=k, v=v: F.scaled_dot_product_attention(query[:, :, None], k, v, enable_gqa=gqa) for k, v in caches
    ]
    sdpa_ms = {mode: rotating_ms(sdpa_calls, mode == "graph") for mode in ("eager", "graph")}
    sdpa_calls.clear()
    caches.clear()
    torch.cuda.empty_cache()

    latents = [latent_inputs(kv_heads, batch, tokens, g) for _ in range(copies_for(latent_bytes))]
    if EIGHT_BIT is not None:
        latents = [quantize_inputs(x) for x in latents]
    # RoPE tables: charged per layer as one computation per decode step for all its LAYERS, as the model did until
    # e7531a0; its cache now keeps them, each token's made once, so the charge is conservative
    tables = [kernels.rope_tables(x["positions"], x["inv_freq"], 1.0, torch.bfloat16) for x in latents]
    table_calls = [lambda x=x: kernels.rope_tables(x["positions"], x["inv_freq"], 1.0, torch.bfloat16) for x in latents]
    table_ms = rotating_ms(table_calls, graphs=False) / LAYERS
    ours_calls = [
        lambda x=x, t=t: kernels.latent_decode_attention(query, **x, tables=t, config=CONFIG)
        for x, t in zip(latents, tables)
    ]
    ours_ms = {mode: rotating_ms(ours_calls, mode == "graph") + table_ms for mode in ("eager", "graph")}
    ours_calls.clear()
    tables.clear()

    # accuracy on this row's inputs (first two sequences) against the fp32 PyTorch reference
    sample = dict(latents[0])
    for key in ("key_latents", "value_latents", "positions"):
        sample[key] = sample[key][:2]
    sample_tables = kernels.rope_tables(sample["positions"], sample["inv_freq"], 1.0, torch.bfloat16)
    got = kernels.latent_decode_attention(query[:2], **sample, tables=sample_tables, config=CONFIG).float()
    if "codecs" in sample:  # the reference reads the decoded latents
        codecs = sample.pop("codecs")
        sample["key_latents"], sample["value_latents"] = (
            c.decode(sample[n], torch.float32) for c, n in zip(codecs, ("key_latents", "value_latents"))
        )
    as_fp32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in sample.items()}
    expected = kernels.latent_decode_reference(query[:2].float(), **as_fp32)
    rel_error = ((got - expected).norm() / expected.norm()).item()
    latents.clear()
    torch.cuda.empty_cache()

    floors = {
        "full_cache": full_bytes / bandwidth * 1e3,
        "latent": latent_bytes / bandwidth * 1e3,  # the latents as cached (bf16, or codes and scales)
    }
    return {
        "shape": name,
        "heads": heads,
        "kv_heads": kv_heads,
        "batch": batch,
        "context": tokens,
        "k_ranks": K_RANK,
        "v_rank": kv_heads * V_PER_HEAD,
        "kv_bits": "16" if EIGHT_BIT is None else ("4" if EIGHT_BIT == 0 else f"mixed {EIGHT_BIT}"),
        "latent_bytes_per_token": latent_bytes // (batch * tokens),
        "sdpa_ms": sdpa_ms,
        "rope_tables_ms_per_layer": table_ms,
        "starkv_ms": ours_ms,
        "speedup": {mode: sdpa_ms[mode] / ours_ms[mode] for mode in sdpa_ms},
        "floor_ms": floors,
        "starkv_over_latent_floor": {mode: ours_ms[mode] / floors["latent"] for mode in ours_ms},
        "achieved_latent_bandwidth_TBps": {mode: latent_bytes / (ours_ms[mode] * 1e-3) / 1e12 for mode in ours_ms},
        "rel_error_vs_fp32_reference": rel_error,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--rows", type=int, nargs="*", help="indices of ROWS to run (default: all)")
    p.add_argument("--kv-bits", choices=sorted(SETTINGS), default="16", help="16: K 30%% / V 50%% bf16 latents; "
                   "4: K 25%% / V 25%% latents in 4 bits")  # fmt: skip
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=JSON",
                   help="kernel launch settings, e.g. half_scores=false (results go to a suffixed file)")  # fmt: skip
    args = p.parse_args()
    global K_RANK, V_PER_HEAD, EIGHT_BIT
    K_RANK, V_PER_HEAD, EIGHT_BIT = SETTINGS[args.kv_bits]
    CONFIG.update(launch_settings(p, args.config))
    kernels = import_remote("latent_decode")
    bandwidth = copy_bandwidth()
    rows = [run_row(kernels, *ROWS[i], bandwidth) for i in (args.rows or range(len(ROWS)))]
    result = {"benchmark": "decode_attention", **environment(), "copy_bandwidth_TBps": bandwidth / 1e12,
              "config": CONFIG, "rows": rows}  # fmt: skip
    name = "decode_attention" if args.kv_bits == "16" else f"decode_attention_{args.kv_bits}bit"
    name += re.sub(r"[^a-z0-9_.-]+", "-", "".join(f"_{k}_{json.dumps(v)}".lower() for k, v in CONFIG.items()))
    path = write_results(name, {**result, "kv_bits": args.kv_bits}, args.out)
    print(f"wrote {path}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("times in ms (eager launches | CUDA-graph replays); floor: latent bytes as cached / copy bandwidth")
    print(f"{'shape':8s} {'B':>3s} {'ctx':>4s} {'SDPA':>13s} {'STAR-KV':>13s} {'speedup':>13s} {'floor':>6s} "
          f"{'x floor (graph)':>15s} {'rel err':>8s}")  # fmt: skip
    for r in rows:
        e, gr = "eager", "graph"
        print(f"{r['shape']:8s} {r['batch']:3d} {r['context'] // 1024:3d}K "
              f"{r['sdpa_ms'][e]:6.3f}|{r['sdpa_ms'][gr]:6.3f} {r['starkv_ms'][e]:6.3f}|{r['starkv_ms'][gr]:6.3f} "
              f"{r['speedup'][e]:5.2f}x|{r['speedup'][gr]:5.2f}x {r['floor_ms']['latent']:6.3f} "
              f"{r['starkv_over_latent_floor'][gr]:14.2f}x {r['rel_error_vs_fp32_reference']:8.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
