"""
Whether the TMA settings of the decode kernel (`scores_tma`, `values_tma`) give the default's output on large
shapes, per sequence (relative difference), including caches over 2 GiB. A development check for the H100:

    PYTHONPATH=. python benchmarks/tma_check.py

(Session 16 ran this script's logic from a scratch copy; its printout is transcribed in
results/tma_check_6dc46ce.json.)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention  # noqa: E402

from starkv_convert.remote_code import import_remote  # noqa: E402

kernels = import_remote("latent_decode")
OFF = {"scores_tma": False, "values_tma": False}
VALUES = {"values_tma": True}
CASES = [  # KV heads (32: the MHA 7B shape), batch, tokens, settings compared with OFF
    (32, 16, 32768, [VALUES, {**VALUES, "value_block": 64}, {**VALUES, "values_warps": 4}]),
    (32, 16, 8192, [VALUES]),
    (32, 4, 32768, [VALUES]),
    (32, 16, 65536, [{"scores_tma": True}, VALUES]),
]


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for kv_heads, batch, tokens, settings in CASES:
        inputs = decode_attention.latent_inputs(kv_heads, batch, tokens, g)
        tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, torch.bfloat16)
        query = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        ref = kernels.latent_decode_attention(query, **inputs, tables=tables, config=OFF).float()
        gb = inputs["value_latents"].nbytes / 1e9
        for config in settings:
            out = kernels.latent_decode_attention(query, **inputs, tables=tables, config={**OFF, **config}).float()
            per_seq = ((out - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).tolist()
            print(f"{kv_heads} KV heads, B={batch}, T={tokens} ({gb:.2f} GB of value latents) {config}: "
                  f"{' '.join(f'{d:.0e}' for d in per_seq)}", flush=True)  # fmt: skip
        inputs = tables = ref = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
