"""
The decode kernels compiled for the H100 (sm_90a) on a machine without a GPU: registers, spills, shared memory, the
programs that fit a multiprocessor, and the tensor-core waits and SASS instruction mix of each kernel's main loop,
per launch setting. A development tool for trying kernel changes before
spending GPU time; it counts instructions, it does not time them (on the H100, 32% fewer scores-pass instructions
made that pass 6-10% faster: see benchmarks/README.md).

Use the device's triton (3.6) for counts that match it, in a venv of its own:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch==2.13.0 numpy
    /tmp/t36/bin/python benchmarks/sass_report.py [--rows 3 1] [--config '{"block_tokens": 32}'] [--sass out.txt]

It replaces triton's GPU driver with one that only names the target, so that `kernel.warmup` compiles without a
device (triton internals: may need adjusting for other triton versions).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from starkv_convert.remote_code import import_remote  # noqa: E402  (stdlib only: runs without transformers)

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ROWS = [  # name, query heads, KV heads, batch, tokens (tokens only change the launch grid, not the code)
    ("MHA 7B", 32, 32, 1, 1024),
    ("MHA 7B", 32, 32, 16, 1024),
    ("GQA 8B", 32, 8, 1, 1024),
    ("GQA 8B", 32, 8, 16, 1024),
]


class TargetOnlyDriver(DriverBase):
    """Enough of a driver for triton to compile for sm_90a; nothing can be launched."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        return None

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_call(kernels, row, config: dict, kv_bits: int = 16) -> dict:
    """
    Compiles (never launches) every kernel a decode call of `row` would launch; {kernel name: compiled}. kv_bits 16:
    bf16 latents, K 38 / V 64 a head; 4: the 4-bit codecs' rows, K 32 / V 32 a head (decode_attention.py's settings).
    """
    compiled = {}

    def getitem(fn, grid):
        def launch(*args, **kwargs):
            compiled[fn.__name__] = fn.warmup(*args, grid=grid, **kwargs)

        return launch

    _, heads, kv_heads, batch, tokens = row
    d, k_rank, v_rank = (128, 38, 64) if kv_bits == 16 else (128, 32, 32)
    bf16 = dict(dtype=torch.bfloat16)
    inputs = dict(
        key_latents=torch.zeros(batch, tokens, kv_heads * k_rank, **bf16),
        value_latents=torch.zeros(batch, tokens, kv_heads * v_rank, **bf16),
        positions=torch.arange(tokens, dtype=torch.int32).expand(batch, -1).contiguous(),
        valid=None,
        k_up_weight=torch.zeros(d, kv_heads * k_rank, **bf16),
        k_ranks=[k_rank] * kv_heads,
        k_bias=None,
        k_norm=None,
        inv_freq=torch.ones(d // 2),
        rope_scale=1.0,
        v_up_weight=torch.zeros(kv_heads * d, kv_heads * v_rank, **bf16),
        v_bias=None,
        scaling=d**-0.5,
    )
    if kv_bits == 4:
        quant = import_remote("latent_quant")
        codecs = (quant.LatentCodec([k_rank] * kv_heads, [0] * kv_heads, 32),
                  quant.LatentCodec([kv_heads * v_rank], [0], 32))  # fmt: skip
        rows = [c.encode(inputs[n]) for c, n in zip(codecs, ("key_latents", "value_latents"))]
        inputs.update(key_latents=rows[0], value_latents=rows[1], codecs=codecs)
    tables = kernels.rope_tables(inputs["positions"], inputs["inv_freq"], 1.0, torch.bfloat16)
    query = torch.zeros(batch, heads, d, **bf16)
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = getitem
    try:
        kernels.latent_decode_attention(query, **inputs, tables=tables, config=config)
    except RuntimeError as e:  # the output projection runs on the unlaunched buffers' garbage: only compiling counts
        if not compiled:
            raise
        print(f"  (after compiling: {type(e).__name__}: {str(e)[:80]})")
    finally:
        JITFunction.__getitem__ = original
    return compiled


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body (the tile loop)."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:$", line)}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return [line for line in lines[best[0] : best[1] + 1] if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]


def opcode_counts(instructions: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in instructions:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def resident(registers: int, shared: int, warps: int) -> int:
    """Programs that fit on one H100 multiprocessor: 64K registers (allocated per warp in units of 256) and 227 KB of
    shared memory per program at most (228 KB per multiprocessor, 1 KB of it reserved per program)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps) if registers else 99
    by_shared = (228 * 1024) // (shared + 1024)
    return min(by_registers, by_shared, 32)


def report(name: str, kernel, sass_path: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([BIN / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage.stdout)
    stack = re.search(r"STACK:(\d+)", usage.stdout)
    body = loop_body(sass)
    top = " ".join(f"{op}:{n}" for op, n in list(opcode_counts(body).items())[:16])
    shared, warps = kernel.metadata.shared, kernel.metadata.num_warps
    registers = int(regs.group(1)) if regs else 0
    waits = sum("DEPBAR.LE gsb0" in line for line in body)
    print(f"  {name}: {registers} registers, stack {stack and stack.group(1)} B, shared {shared / 1024:.0f} KB, "
          f"{resident(registers, shared, warps)} programs/SM, loop {len(body)} instructions, {waits} tensor-core "
          f"waits | {top}")  # fmt: skip
    if sass_path:
        Path(sass_path).write_text(sass)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="*", default=[3, 1], help="indices of ROWS")
    p.add_argument("--config", default="{}", help="launch settings as JSON (DEFAULT_CONFIG keys)")
    p.add_argument("--kernels", nargs="*", default=["_scores_kernel", "_values_kernel"])
    p.add_argument("--sass", help="write the last kernel's SASS here")
    p.add_argument("--kv-bits", type=int, choices=[16, 4], default=16, help="bf16 latents, or 4-bit codes")
    args = p.parse_args()
    driver.set_active(TargetOnlyDriver())
    kernels = import_remote("latent_decode")
    kernels._multiprocessors = lambda device: 132  # the H100's, for the launch grids
    config = json.loads(args.config)
    print(f"triton {triton.__version__}, sm_90a, settings {config}")
    for index in args.rows:
        row = ROWS[index]
        print(f"{row[0]} B={row[3]}:")
        compiled = compile_call(kernels, row, config, args.kv_bits)
        for name in args.kernels:
            if name in compiled:
                report(name, compiled[name], args.sass)
            else:
                print(f"  {name}: not launched with these settings")


if __name__ == "__main__":
    main()
