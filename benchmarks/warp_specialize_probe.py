"""
Whether triton warp-specializes a loop shaped like the scores pass's, compiled for the H100 (sm_90a) without a GPU:
per tile, TMA-descriptor loads of latents and RoPE tables, the key rebuild and the score products on the tensor
cores, RoPE between them. A development probe for a triton upgrade (`tl.range(warp_specialize=True)` is how `tl`
would overlap the loads and products of different tiles; benchmarks/README.md, session 15). Run it in a venv with the
device's triton, as `sass_report.py` says:

    /tmp/t36/bin/python benchmarks/warp_specialize_probe.py

Prints, per setting, whether it compiled, whether the TTGIR has warp-specialized partitions, and `sass_report`'s line.
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_report  # noqa: E402


@triton.jit
def _probe_kernel(
    z_desc, cos_desc, sin_desc, W, Q, S, T, tiles,
    BT: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr, GP: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    split, b = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, 2 * HALF)
    w = tl.load(W + tl.arange(0, R)[:, None] * (2 * HALF) + d[None, :])  # (R, 2 HALF): RoPE halves side by side
    g = tl.arange(0, GP)
    q = tl.load(Q + b * 2 * HALF * GP + d[:, None] * GP + g[None, :])
    i = tl.arange(0, BT)
    for tile in tl.range(split * tiles, split * tiles + tiles, warp_specialize=WS, num_stages=STAGES):
        row = b * T + tile * BT
        k = tl.dot(z_desc.load([row, 0]), w)
        cos, sin = cos_desc.load([row, 0]).to(tl.float32), sin_desc.load([row, 0]).to(tl.float32)
        k_lo, k_hi = tl.split(tl.permute(tl.reshape(k, [BT, 2, HALF]), (0, 2, 1)))
        rot_lo, rot_hi = (k_lo * cos - k_hi * sin).to(tl.bfloat16), (k_hi * cos + k_lo * sin).to(tl.bfloat16)
        rot = tl.reshape(tl.permute(tl.join(rot_lo, rot_hi), (0, 2, 1)), [BT, 2 * HALF])
        tl.store(S + (row + i)[:, None] * GP + g[None, :], tl.dot(rot, q).to(tl.float16))


def compile_probe(warp_specialize: bool, warps: int, stages: int = 3):
    """The probe compiled (never launched) for one setting: GQA-like, 64-token tiles, a 64-column rank chunk."""
    batch, tokens, rank, half, gp, bt = 2, 4096, 64, 64, 16, 64
    z = torch.zeros(batch * tokens, rank, dtype=torch.bfloat16)
    cos = torch.zeros(batch * tokens, half, dtype=torch.float16)
    descs = [TensorDescriptor.from_tensor(t, [bt, t.shape[1]]) for t in (z, cos, cos)]
    w = torch.zeros(rank, 2 * half, dtype=torch.bfloat16)
    q = torch.zeros(batch, 2 * half, gp, dtype=torch.bfloat16)
    s = torch.zeros(batch * tokens, gp, dtype=torch.float16)
    return _probe_kernel.warmup(
        *descs, w, q, s, tokens, 8, BT=bt, R=rank, HALF=half, GP=gp, WS=warp_specialize, STAGES=stages,
        num_warps=warps, grid=(8, batch),
    )  # fmt: skip


def main() -> None:
    driver.set_active(sass_report.TargetOnlyDriver())
    print(f"triton {triton.__version__}, sm_90a")
    for warp_specialize, warps in [(False, 4), (True, 4), (False, 8), (True, 8)]:
        name = f"warp_specialize={warp_specialize}, {warps} warps"
        try:
            kernel = compile_probe(warp_specialize, warps)
        except Exception as e:  # triton reports a failed pass as RuntimeError
            print(f"  {name}: does not compile ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        partitions = "ttg.warp_specialize" in kernel.asm["ttgir"]
        print(f"  {name}: compiles, {'with' if partitions else 'no'} warp-specialized partitions")
        sass_report.report(name, kernel, None)


if __name__ == "__main__":
    main()
