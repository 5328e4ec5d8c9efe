"""
End-to-end decode on an H100: a Llama-3.1-8B-shaped model (random bf16 weights) against its STAR-KV version with
K keeping 30% (38 of 128 per KV head) and V 50% (512 of 1024) of the cache, both with transformers' dynamic caches.

    python benchmarks/generate.py [--context 32768] [--batch 16] [--steps 16]
    python benchmarks/generate.py --kv-bits 4   # K 25% (32 of 128) / V 25% (256 of 1024), latents in 4 bits
    python benchmarks/generate.py --check-greedy CHECKPOINT   # kernel vs PyTorch path, 64 greedy tokens

Caches are filled with random values of the right shapes instead of running a prefill: prefill memory is the subject
of the chunked-prefill issue, this measures decode. Largest batch: the largest batch whose cache at --context plus
two decode steps fit on the card (bisection on out-of-memory errors).
"""

import argparse
import gc
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # both models: less fragmentation
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, with_cache, write_results  # noqa: E402

from starkv_convert.build import starkv_config  # noqa: E402
from starkv_convert.ranks import RankPlan  # noqa: E402
from starkv_convert.remote_code import import_remote  # noqa: E402

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip
SETTINGS = {"16": (38, 512, False), "4": (32, 256, True)}  # --kv-bits: key rank per head, value rank, 4-bit latents
K_RANK, V_RANK, FOUR_BIT = SETTINGS["16"]


def stock_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_31_8B)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return LlamaForCausalLM(config).eval()


def starkv_model():
    from transformers import LlamaConfig

    layers = LLAMA_31_8B["num_hidden_layers"]
    plan = RankPlan(k=[[K_RANK] * 8 for _ in range(layers)], v=[V_RANK] * layers)
    kv_quant = {"group": 32, "k_n8": [[0] * 8 for _ in range(layers)], "v_n8": [0] * layers} if FOUR_BIT else None
    config = starkv_config(LlamaConfig(**LLAMA_31_8B), plan, torch.bfloat16, kv_quant)
    model_class = import_remote("modeling_starkv").StarKVForCausalLM
    with torch.device("cuda"):
        return model_class(config).eval()


def filled_cache(model, batch: int, tokens: int):
    """A cache of `tokens` random entries per sequence, as the model's generate() would hold after a prefill."""
    config = model.config
    g = torch.Generator(device="cuda").manual_seed(0)
    if config.model_type == "starkv":
        cache = import_remote("cache_starkv").StarKVCache(config)
        for i, layer in enumerate(model.model.layers):
            if config.kv_quant is not None:  # one sequence's codes and scales, repeated over the batch
                zk = torch.randn(1, tokens, sum(config.kv_k_ranks[i]), device="cuda", dtype=torch.bfloat16, generator=g)
                zv = torch.randn(1, tokens, config.kv_v_ranks[i], device="cuda", dtype=torch.bfloat16, generator=g)
                k_codec, v_codec = layer.self_attn.codecs
                zk, zv = (rows.expand(batch, -1, -1).contiguous() for rows in (k_codec.encode(zk), v_codec.encode(zv)))
            else:
                shape = (batch, tokens)
                zk = torch.randn(*shape, sum(config.kv_k_ranks[i]), device="cuda", dtype=torch.bfloat16, generator=g)
                zv = torch.randn(*shape, config.kv_v_ranks[i], device="cuda", dtype=torch.bfloat16, generator=g)
            cache.update_latents(zk, zv, i)
        cache.update_positions(torch.arange(tokens, device="cuda")[None], batch)
        return cache
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    shape = (batch, config.num_key_value_heads, tokens, config.head_dim)
    for i in range(config.num_hidden_layers):
        k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
        cache.update(k, torch.randn_like(k), i)
    return cache


@torch.no_grad()
def decode_steps(model, cache, batch: int, tokens: int, steps: int) -> float:
    """Seconds per greedy decode step (the mean over `steps` after two warm-up steps)."""
    token = torch.randint(0, 1000, (batch, 1), device="cuda")
    elapsed = 0.0
    for step in range(steps + 2):
        position = torch.full((batch, 1), tokens + step, device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(input_ids=token, **with_cache(cache), position_ids=position, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        if step >= 2:
            elapsed += time.perf_counter() - start
    return elapsed / steps


def fits(model, batch: int, tokens: int) -> bool:
    try:
        cache = filled_cache(model, batch, tokens)
        decode_steps(model, cache, batch, tokens, 1)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        cache = None
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(model, tokens: int, high: int = 512) -> int:
    low = 0  # fits(low) holds; find the largest fitting batch up to `high`
    while low < high:
        mid = (low + high + 1) // 2
        if fits(model, mid, tokens):
            low = mid
        else:
            high = mid - 1
    return low


def build_bf16(build):
    """`build()` with bf16 as the default dtype (random weights are made in bf16 directly)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return build()
    finally:
        torch.set_default_dtype(previous)


def measure(name: str, build, batch: int, tokens: int, steps: int, largest: int | None = None) -> dict:
    """Decode speed and memory of `build()` at `batch` (0: its largest batch) and `tokens` of context."""
    model = build_bf16(build)
    weights = torch.cuda.memory_allocated()
    result = {"model": name, "weights_GB": weights / 1e9}
    result["largest_batch"] = largest if largest is not None else largest_batch(model, tokens)
    result["batch"] = batch = min(batch, result["largest_batch"]) if batch else result["largest_batch"]
    while True:  # the bisection ran 3 steps: at the edge of memory a longer run may not fit, then step down by 2%
        try:
            cache = filled_cache(model, batch, tokens)
            result["cache_GB"] = (torch.cuda.memory_allocated() - weights) / 1e9
            torch.cuda.reset_peak_memory_stats()
            seconds = decode_steps(model, cache, batch, tokens, steps)
            break
        except torch.OutOfMemoryError:
            cache = None
            gc.collect()
            torch.cuda.empty_cache()
            if batch < result["largest_batch"] or batch <= 1:
                raise
            result["largest_batch"] = result["batch"] = batch = batch - max(1, batch // 50)
            print(f"{name}: out of memory over {steps} steps, retrying at batch {batch}", flush=True)
    result.update(
        ms_per_step=seconds * 1e3,
        tokens_per_s=batch / seconds,
        peak_GB=torch.cuda.max_memory_allocated() / 1e9,
    )
    cache = model = None
    gc.collect()
    torch.cuda.empty_cache()
    print(f"{name}: {result}", flush=True)
    return result


@torch.no_grad()
def check_greedy(folder: str, tokens: int = 64) -> dict:
    """
    Greedy tokens through the Triton kernel and through the PyTorch path, on a left-padded batch of 2, in float32
    (where both compute the same function to ~1e-6) and in bfloat16 (where both round differently, so a near-tie
    between two tokens may break either way; the first differing step is reported).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = ["The history of the Roman Empire", "Write a short poem about the sea and the wind that moves it."]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    prompt_len = inputs["input_ids"].shape[1]
    result = {"checkpoint": folder, "new_tokens": tokens, "batch": 2}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).cuda().eval()
        outputs = {}
        for choice in ("torch", "triton"):
            os.environ["STARKV_DECODE_KERNEL"] = choice
            outputs[choice] = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        new = {k: v[:, prompt_len:] for k, v in outputs.items()}
        differs = (new["torch"] != new["triton"]).any(0).nonzero()
        name = str(dtype).removeprefix("torch.")
        result[name] = {
            "identical": bool(torch.equal(new["torch"], new["triton"])),
            "first_differing_step": int(differs[0]) if len(differs) else None,
            "sample": tokenizer.batch_decode(new["triton"], skip_special_tokens=True),
        }
        model = None
        torch.cuda.empty_cache()
    print(result, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--check-greedy", metavar="CHECKPOINT")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--kv-bits", choices=sorted(SETTINGS), default="16", help="16: K 30%% / V 50%% bf16 latents; "
                   "4: K 25%% / V 25%% latents in 4 bits")  # fmt: skip
    args = p.parse_args()
    global K_RANK, V_RANK, FOUR_BIT
    K_RANK, V_RANK, FOUR_BIT = SETTINGS[args.kv_bits]
    label = "STAR-KV K30%/V50%" if args.kv_bits == "16" else "STAR-KV K25%/V25% 4-bit"
    env = environment()
    if args.check_greedy:
        write_results("greedy_kernel_vs_torch", {**env, **check_greedy(args.check_greedy)}, args.out)
        return
    stock = measure("stock Llama-3.1-8B shape, SDPA, DynamicCache", stock_model, 0, args.context, args.steps)
    batch = min(args.batch, stock["largest_batch"])
    ours_max = measure(f"{label}, Triton decode, at its largest batch", starkv_model, 0, args.context, args.steps)
    largest = ours_max["largest_batch"]
    ours = measure(f"{label}, Triton decode", starkv_model, batch, args.context, args.steps, largest)
    stock_at = stock
    if batch != stock["largest_batch"]:
        stock_at = measure(
            "stock at the same batch", stock_model, batch, args.context, args.steps, stock["largest_batch"]
        )
    result = {
        "benchmark": "generate",
        **env,
        "context": args.context,
        "k_rank": K_RANK,
        "v_rank": V_RANK,
        "kv_bits": args.kv_bits,
        "rows": [stock, stock_at, ours, ours_max],
        "decode_speedup_same_batch": ours["tokens_per_s"] / stock_at["tokens_per_s"],
        "throughput_ratio_each_at_largest_batch": ours_max["tokens_per_s"] / stock["tokens_per_s"],
        "largest_batch_ratio": ours_max["largest_batch"] / stock["largest_batch"],
    }
    path = write_results("generate" if args.kv_bits == "16" else f"generate_{args.kv_bits}bit", result, args.out)
    print(f"wrote {path}")
    print(f"{'model':48s} {'batch':>5s} {'max B':>5s} {'ms/step':>8s} {'tok/s':>7s} {'peak GB':>8s}")
    for r in result["rows"]:
        print(f"{r['model']:48s} {r['batch']:5d} {r['largest_batch']:5d} {r['ms_per_step']:8.1f} "
              f"{r['tokens_per_s']:7.1f} {r['peak_GB']:8.1f}")  # fmt: skip
    print(f"decode speedup at batch {batch}: {result['decode_speedup_same_batch']:.2f}x; largest batch ratio "
          f"{result['largest_batch_ratio']:.2f}x; tokens/s each at its largest batch "
          f"{result['throughput_ratio_each_at_largest_batch']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
