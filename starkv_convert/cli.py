"""Command lines: starkv-convert, starkv-eval, starkv-push."""

import argparse
import json
import sys
from collections.abc import Callable

from .errors import StarKVError
from .learn import CPU_SIZES, GPU_SIZES, LearnOptions
from .quant_split import AUTO_BUDGETS, DEFAULT_BLOCKS


def _run(action: Callable[[], None]) -> int:
    """Runs `action`; bad input exits 2 with a one-line message, Ctrl-C exits 130."""
    try:
        action()
    except StarKVError as e:
        print(f"starkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"starkv: interrupted; no output folder was written{e.args[0] if e.args else ''}", file=sys.stderr)
        return 130
    return 0


def add_learn_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The learned method's flags (shared by starkv-convert and the benchmarks); returns their group."""
    learn = parser.add_argument_group("learned method")
    defaults = LearnOptions()
    gpu, cpu = GPU_SIZES, CPU_SIZES
    learn.add_argument(
        "--steps", type=int, help=f"threshold-phase steps at most (default {gpu[0]} on GPU, {cpu[0]} on CPU)"
    )
    learn.add_argument("--recovery-steps", type=int, help=f"factor-training steps (default {gpu[1]} / {cpu[1]})")
    learn.add_argument("--lr", type=float, default=defaults.lr, help="learning rate, relative to each tensor's scale")
    learn.add_argument("--threshold-lr", type=float, help=f"default {gpu[3]} GPU, {cpu[3]} CPU")
    learn.add_argument("--compression", type=float, default=defaults.compression, help="weight of exp(-threshold)")
    learn.add_argument("--train-batch-size", type=int, help=f"blocks per training step (default {gpu[2]} / {cpu[2]})")
    learn.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps, 0: never")
    return learn


def learn_options(args: argparse.Namespace, **overrides) -> LearnOptions:
    """LearnOptions from the flags of `add_learn_arguments`."""
    values = dict(
        steps=args.steps,
        recovery_steps=args.recovery_steps,
        lr=args.lr,
        threshold_lr=args.threshold_lr,
        compression=args.compression,
        batch_size=args.train_batch_size,
        checkpoint_every=args.checkpoint_every,
    )
    return LearnOptions(**{**values, **overrides})


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="starkv-convert",
        description="Convert a Llama-family causal LM into a STAR-KV checkpoint with a low-rank latent KV cache.",
    )
    p.add_argument("model", nargs="?", help="Hub id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("-o", "--output", help="output folder (default: <model>-starkv-<ratio>)")
    p.add_argument("--kv-ratio", type=float, default=0.5, help="fraction of KV-cache values kept per token (0, 1]")
    p.add_argument("--k-ratio", type=float, help="give keys their own budget (with --v-ratio)")
    p.add_argument("--v-ratio", type=float, help="give values their own budget (with --k-ratio)")
    p.add_argument(
        "--method",
        default="learned",
        help="rank selection: learned (soft thresholds + distillation, default), "
        "energy (whitened spectral energy) or uniform",
    )
    p.add_argument("--uniform", action="store_const", const="uniform", dest="method", help="same as --method uniform")
    p.add_argument("--init", default="whitened", help="whitened (activation-aware SVD, default) or svd (plain SVD)")
    p.add_argument("--damp", type=float, default=0.001, help="whitening damping, relative to the mean input power")
    p.add_argument(
        "--calibration",
        help="Hub dataset name[:config[:split]], or .txt/.jsonl/.parquet files or folders (default: text sampled "
        "from the model itself)",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        help="calibration blocks (default: 128 for learned on a GPU, else 32)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration block")
    p.add_argument("--eval-samples", type=int, default=4, help="held-out blocks for the perplexity in the card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-layers", help="comma-separated layers to keep full, e.g. 0,1,-1")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=4, help="calibration blocks per forward pass")
    p.add_argument(
        "--device-map",
        choices=["auto"],
        help="spread the model over the GPUs, CPU memory and disk with accelerate (models larger than one GPU)",
    )
    p.add_argument("--max-memory", help="with --device-map auto: memory per device, e.g. 0:20GiB,1:20GiB,cpu:64GiB")
    learn = add_learn_arguments(p)
    learn.add_argument("--resume", action="store_true", help="continue from OUTPUT.train-state of an interrupted run")
    p.add_argument(
        "--kv-bits",
        default="16",
        choices=["16", "8", "4", "mixed", "auto"],
        help="cached latents in the model dtype (16), int8, int4, mixed (the leading channels of every block in 8 "
        "bits) or auto (per block, as many 8-bit channels as calibration errors say, at mixed's bytes)",
    )
    p.add_argument(
        "--kv-8bit-share",
        type=float,
        default=0.25,
        help="mixed: share of each block's channels in 8 bits; auto: the bytes per token of mixed at this share",
    )
    p.add_argument(
        "--kv-auto-blocks",
        type=int,
        help=f"with --kv-bits auto: calibration blocks measured to choose the split (default {DEFAULT_BLOCKS})",
    )
    p.add_argument(
        "--kv-auto-budget",
        choices=AUTO_BUDGETS,
        help="with --kv-bits auto: keys and values each keep mixed's bytes of their side (side, default; measured "
        "better on SmolLM2), or mixed's bytes shared by all blocks (model)",
    )
    p.add_argument(
        "--kv-row-align",
        type=int,
        choices=[1, 2, 4, 8, 16],
        help="quantized latents: each block's codes in a cache row start at a multiple of this many bytes (default "
        "4: the decode kernel reads whole words, 1.7x faster decode on the H100; 1: the most compact rows, a few "
        "percent smaller on small ranks)",
    )
    p.add_argument(
        "--kv-rotate",
        action=argparse.BooleanOptionalAction,
        help="4-bit latent channels: rotate each block's by a fixed orthogonal matrix folded into its factors before "
        "they are quantized (default: on; the model is unchanged at full precision, its 4-bit latents lose far less)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the validated checkpoint to the Hub")
    p.add_argument("--private", action="store_true", help="make the Hub repository private")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def convert_main(argv: list[str] | None = None) -> int:
    from .convert import ConvertOptions, convert

    args = convert_parser().parse_args(argv)
    learn = learn_options(args, seed=args.seed)
    options = ConvertOptions(
        model=args.model,
        output=args.output,
        kv_ratio=args.kv_ratio,
        k_ratio=args.k_ratio,
        v_ratio=args.v_ratio,
        method=args.method,
        init=args.init,
        damp=args.damp,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        seq_len=args.seq_len,
        eval_samples=args.eval_samples,
        seed=args.seed,
        skip_layers=args.skip_layers,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        max_memory=args.max_memory,
        batch_size=args.batch_size,
        kv_bits=args.kv_bits,
        kv_8bit_share=args.kv_8bit_share,
        kv_auto_blocks=args.kv_auto_blocks,
        kv_auto_budget=args.kv_auto_budget,
        kv_row_align=args.kv_row_align,
        kv_rotate=args.kv_rotate,
        learn=learn,
        resume=args.resume,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        private=args.private,
        progress=not args.quiet,
    )
    return _run(lambda: print(convert(options)))


def eval_main(argv: list[str] | None = None) -> int:
    from .evaluate import evaluate

    p = argparse.ArgumentParser(prog="starkv-eval", description="Perplexity and KV-cache bytes per token of a model.")
    p.add_argument("model", nargs="?", help="Hub id, folder (base or STAR-KV) or .gguf file (default: embedded)")
    p.add_argument("--text", required=True, help="UTF-8 text file to measure perplexity on")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=20, help="number of consecutive windows of --seq-len tokens")
    p.add_argument("--start", type=int, default=0, help="token where the first window starts")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)

    def action() -> None:
        result = evaluate(
            args.model, args.text, args.seq_len, args.windows, args.start, args.dtype, args.device, not args.quiet
        )
        print(json.dumps(result, indent=2))

    return _run(action)


def push_main(argv: list[str] | None = None) -> int:
    from .push import push_to_hub

    p = argparse.ArgumentParser(prog="starkv-push", description="Upload a validated STAR-KV checkpoint to the Hub.")
    p.add_argument("folder")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    return _run(lambda: print(push_to_hub(args.folder, args.repo_id, private=args.private)))


if __name__ == "__main__":
    sys.exit(convert_main())
