"""The conversion pipeline: load, calibrate, factorize, choose ranks, export, validate, (push)."""

import json
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .build import build_model, latent_state_dict, starkv_config
from .calibration import calibration_data
from .card import render_model_card
from .errors import StarKVError
from .export import atomic_output, write_checkpoint
from .factorize import LayerFactors, factorize_layer, whitening_factor
from .families import head_dim
from .learn import Budgets, LearnOptions, learn_ranks
from .loading import (
    ModelSource,
    eos_token_id,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from .placement import full_state_dict, module_tensor, parse_max_memory
from .plot import RANKS_PLOT, plot_ranks
from .push import REPORT, push_to_hub
from .quant_split import AUTO_BUDGETS, DEFAULT_BLOCKS, measure_split_errors, pick_blocks, split_summary
from .ranks import (
    Budget,
    ModelShape,
    RankPlan,
    energy_ranks,
    make_budget,
    parse_skip_layers,
    quantization_plan,
    uniform_ranks,
)
from .rotation import rotates_any
from .statistics import attention_input_moments
from .validation import validate_checkpoint

METHODS = ("learned", "energy", "uniform")
KV_BITS = ("16", "8", "4", "mixed", "auto")
INITS = ("whitened", "svd")


@dataclass
class ConvertOptions:
    """Everything `starkv-convert` takes; the defaults are the CLI's."""

    model: str | None = None
    output: str | None = None
    kv_ratio: float = 0.5
    k_ratio: float | None = None
    v_ratio: float | None = None
    method: str = "learned"
    init: str = "whitened"
    damp: float = 0.001
    calibration: str | None = None
    calibration_samples: int | None = None  # None: 128 blocks for the learned method on a GPU, else 32
    seq_len: int = 512
    eval_samples: int = 4
    seed: int = 0
    skip_layers: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # "auto": accelerate spreads the model over GPUs, CPU memory and disk
    max_memory: str | None = None  # with device_map: "0:20GiB,cpu:64GiB"
    batch_size: int = 4
    kv_bits: str = "16"  # "16" (latents in the model dtype), "8", "4", "mixed" or "auto"
    kv_8bit_share: float = 0.25  # "mixed": the leading share of each block's channels in 8 bits; "auto": its bytes
    kv_auto_blocks: int | None = None  # "auto": calibration blocks measured (None: quant_split.DEFAULT_BLOCKS)
    kv_auto_budget: str | None = None  # "auto": mixed's bytes pooled over the "model" (None) or per "side"
    kv_row_align: int | None = None  # quantized: cache rows' alignment in bytes (None: latent_quant.ROW_ALIGN, 4)
    kv_rotate: bool | None = None  # 4-bit channels rotated before quantization (rotation.py; None: yes)
    learn: LearnOptions = field(default_factory=LearnOptions)
    resume: bool = False
    overwrite: bool = False
    push_to_hub: str | None = None
    private: bool = False
    progress: bool = True
    command: str = field(default_factory=lambda: " ".join(["starkv-convert", *sys.argv[1:]]))


class ConversionFailed(StarKVError):
    """The checkpoint was written but failed validation (so it is not pushed)."""


def _log(options: ConvertOptions, message: str) -> None:
    if options.progress:
        print(f"[starkv] {message}", file=sys.stderr, flush=True)


def check_options(options: ConvertOptions) -> None:
    """Rejects bad option values before any work is done."""
    if options.method not in METHODS:
        raise StarKVError(f"--method {options.method!r} is not one of {', '.join(METHODS)}")
    if options.init not in INITS:
        raise StarKVError(f"--init {options.init!r} is not one of {', '.join(INITS)}")
    if not 0 <= options.damp < 1:
        raise StarKVError(f"--damp must be in [0, 1), got {options.damp}")
    if (options.calibration_samples or 1) < 1 or options.seq_len < 2 or options.eval_samples < 0:
        raise StarKVError("--calibration-samples must be >= 1, --seq-len >= 2 and --eval-samples >= 0")
    learn = options.learn.resolved(cuda=False)
    if learn.steps < 0 or learn.recovery_steps < 0 or learn.batch_size < 1 or learn.checkpoint_every < 0:
        raise StarKVError("--steps, --recovery-steps and --checkpoint-every must be >= 0, --train-batch-size >= 1")
    if not (learn.lr > 0 and learn.threshold_lr > 0 and learn.compression >= 0):
        raise StarKVError("--lr and --threshold-lr must be > 0 and --compression >= 0")
    if options.kv_bits not in KV_BITS:
        raise StarKVError(f"--kv-bits {options.kv_bits!r}: use 16, 8, 4, mixed or auto")
    if not 0 <= options.kv_8bit_share <= 1:
        raise StarKVError(f"--kv-8bit-share must be in [0, 1], got {options.kv_8bit_share}")
    for flag, value in (("--kv-auto-blocks", options.kv_auto_blocks), ("--kv-auto-budget", options.kv_auto_budget)):
        if value is not None and options.kv_bits != "auto":
            raise StarKVError(f"{flag} applies with --kv-bits auto: add it, or drop {flag}")
    if options.kv_auto_budget not in (None, *AUTO_BUDGETS):
        raise StarKVError(f"--kv-auto-budget {options.kv_auto_budget!r}: use {' or '.join(AUTO_BUDGETS)}")
    if options.kv_row_align is not None and options.kv_bits == "16":
        raise StarKVError("--kv-row-align applies to quantized latents: add --kv-bits 8, 4, mixed or auto")
    if options.kv_row_align not in (None, 1, 2, 4, 8, 16):
        raise StarKVError(f"--kv-row-align {options.kv_row_align}: use 1, 2, 4, 8 or 16 (bytes)")
    if options.kv_rotate is not None and options.kv_bits in ("16", "8"):
        raise StarKVError("--kv-rotate / --no-kv-rotate apply to 4-bit latent channels: add --kv-bits 4, mixed or auto")
    if options.kv_auto_blocks is not None and options.kv_auto_blocks < 1:
        raise StarKVError(f"--kv-auto-blocks must be >= 1, got {options.kv_auto_blocks}")
    if options.resume and options.method != "learned":
        raise StarKVError("--resume continues the training of --method learned; drop it for other methods")
    if options.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", options.push_to_hub):
        raise StarKVError(f"--push-to-hub {options.push_to_hub!r}: expected ORG/NAME")
    resolve_dtype(options.dtype)
    if options.device_map not in (None, "auto"):
        raise StarKVError(f"--device-map {options.device_map!r}: only 'auto' is supported")
    if options.max_memory and options.device_map is None:
        raise StarKVError("--max-memory applies with --device-map auto: add it")
    try:
        parse_max_memory(options.max_memory)
    except ValueError as e:
        raise StarKVError(str(e)) from None


def resolve_sizes(options: ConvertOptions, device: str) -> ConvertOptions:
    """Fills in the sizes left to the device: the learned method calibrates longer and on more text on a GPU."""
    cuda = device.startswith("cuda")
    samples = options.calibration_samples
    if samples is None:
        samples = 128 if cuda and options.method == "learned" else 32
    return replace(options, calibration_samples=samples, learn=options.learn.resolved(cuda))


def default_output(source: ModelSource, options: ConvertOptions) -> Path:
    name = source.name.split(".")[0] if source.gguf_file else source.name
    return Path(f"{name}-starkv-{options.kv_ratio:g}")


def model_shape(config: Any) -> ModelShape:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(config.num_hidden_layers, kv_heads, head_dim(config), config.hidden_size)


@torch.no_grad()
def factorize_model(
    model: Any, moments: list[torch.Tensor] | None, skip: list[int], damp: float, progress: bool = True
) -> dict[int, LayerFactors]:
    """Factorizations of every compressed layer's key and value projections (float64)."""
    kv_heads = model_shape(model.config).num_kv_heads
    factors = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="factorizing", unit="layer", disable=not progress)):
        if i in skip:
            continue
        whitening = whitening_factor(moments[i], damp) if moments is not None else None
        attn = layer.self_attn
        k_weight, v_weight = module_tensor(attn.k_proj, "weight"), module_tensor(attn.v_proj, "weight")
        if whitening is not None:
            k_weight, v_weight = k_weight.to(whitening.device), v_weight.to(whitening.device)
        factors[i] = factorize_layer(k_weight, v_weight, kv_heads, whitening)
    return factors


def choose_ranks(
    factors: dict[int, LayerFactors], shape: ModelShape, skip: list[int], options: ConvertOptions
) -> RankPlan:
    """Ranks by a rule: uniform, or whitened energy (the starting point of `learned`)."""
    budget = make_budget(shape, skip, options.kv_ratio, options.k_ratio, options.v_ratio)
    if options.method == "uniform":
        return uniform_ranks(shape, skip, budget)
    return energy_ranks(factors, shape, skip, budget)


def side_budgets(budget: Budget, energy_plan: RankPlan) -> Budgets:
    """Key and value budgets of the learned method: as given, or split as the whitened energy allocation splits
    the joint budget (keys usually get less than half: they are more compressible)."""
    if budget.total is None:
        return Budgets(k=budget.k, v=budget.v)
    k = sum(sum(r) for r in energy_plan.k if r is not None)
    return Budgets(k=k, v=budget.total - k)


def choose_quantization(
    base_config: Any,
    plan: RankPlan,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    calibration: Any,
    device: str,
    options: ConvertOptions,
) -> tuple[dict | None, dict[str, Any] | None]:
    """
    The config's `kv_quant` for --kv-bits and its summary for the report (None, None for 16 bits). For "auto" the
    exported model (`state`, latents unquantized) first runs a few calibration blocks on `device`, measuring every
    block's error for every split (`quant_split`), with the 4-bit channels rotated as they will be exported.
    """
    if options.kv_bits == "16":
        return None, None
    errors = None
    rotate = options.kv_rotate is not False
    if options.kv_bits == "auto":
        probe = build_model(starkv_config(base_config, plan, dtype), state, device)
        blocks = pick_blocks(calibration.blocks, options.kv_auto_blocks or DEFAULT_BLOCKS)
        errors = measure_split_errors(
            probe, blocks, batch_size=options.batch_size, progress=options.progress, rotate=rotate
        )
        del probe
    pool = options.kv_auto_budget or AUTO_BUDGETS[0]
    kv_quant = quantization_plan(
        plan, options.kv_bits, options.kv_8bit_share, errors=errors, auto_budget=pool, align=options.kv_row_align
    )
    summary = split_summary(plan, kv_quant, options.kv_bits, options.kv_8bit_share, errors, pool)
    summary["rotated_4bit"] = rotate and rotates_any(plan, kv_quant)
    if errors is not None:
        error = summary["relative_error"]
        _log(
            options,
            f"auto split: {summary['share_8bit']:.1%} of latent channels in 8 bits (keys {summary['k_share_8bit']:.1%},"
            f" values {summary['v_share_8bit']:.1%}), {summary['latent_bytes_per_token']} latent bytes per token "
            f"(mixed: {summary['budget']['mixed_latent_bytes_per_token']}); relative key/value error "
            f"{error['auto']['total']:.4g} (mixed: {error['mixed']['total']:.4g})",
        )
    return kv_quant, summary


def state_folder(output: Path) -> Path:
    """Where the learned method keeps its training state for --resume (beside the output folder)."""
    output = Path(output).expanduser().absolute()
    return output.with_name(f"{output.name}.train-state")


def offload_folder(output: Path) -> Path:
    """Where accelerate offloads layers that fit neither GPU nor CPU memory (removed after the conversion)."""
    output = Path(output).expanduser().absolute()
    return output.with_name(f"{output.name}.offload")


def placement(options: ConvertOptions, output: Path) -> dict[str, Any] | None:
    """accelerate's loading arguments for --device-map auto, else None."""
    if options.device_map is None:
        return None
    return {
        "device_map": options.device_map,
        "max_memory": parse_max_memory(options.max_memory),
        "offload_folder": str(offload_folder(output)),
    }


def learn_settings(options: ConvertOptions, source: ModelSource) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state."""
    keys = ("kv_ratio", "k_ratio", "v_ratio", "init", "damp", "calibration", "calibration_samples", "seq_len")
    return {"model": str(source.path), "gguf": source.gguf_file, **{k: getattr(options, k) for k in keys}}


def _environment(device: str) -> dict[str, str]:
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.machine()})"
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": name,
        "python": platform.python_version(),
    }


def build_report(
    options: ConvertOptions,
    source: ModelSource,
    base_config: Any,
    plan: RankPlan,
    shape: ModelShape,
    skip: list[int],
    calibration: Any,
    measured: dict[str, Any],
    problems: list[str],
    timings: dict[str, float],
    dtype: torch.dtype,
    device: str,
    license_name: str | None,
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the model card states, as data (written to starkv_report.json)."""
    base_values = 2 * shape.side_floats * shape.num_layers
    bytes_base, bytes_starkv = measured.get("bytes_per_token_base"), measured.get("bytes_per_token_starkv")
    held_out = len(calibration.eval_blocks)
    return {
        "starkv_version": __version__,
        "base_model": {
            "id": source.base_model_id,
            "source": str(Path(source.path) / source.gguf_file) if source.gguf_file else source.path,
            "model_type": base_config.model_type,
            "dtype": str(dtype).removeprefix("torch."),
            "license": license_name,
        },
        "budget": {
            "kv_ratio": options.kv_ratio,
            "k_ratio": options.k_ratio,
            "v_ratio": options.v_ratio,
            "kept_ratio": plan.ratio(shape),
            "method": options.method,
            "init": options.init,
            "damp": options.damp,
            "skip_layers": skip,
            "kv_bits": options.kv_bits,
            "kv_8bit_share": options.kv_8bit_share if options.kv_bits in ("mixed", "auto") else None,
            "k_values": sum(sum(k) for k in plan.k if k is not None),
            "v_values": sum(v for v in plan.v if v is not None),
        },
        "learning": _learning_report(options, measured) if options.method == "learned" else None,
        "ranks": {"k": plan.k, "v": plan.v},
        "quantization": quantization,
        "kv_cache": {
            "values_per_token": {"base": base_values, "starkv": plan.floats_per_token(shape)},
            "bytes_per_token": {"base": bytes_base, "starkv": bytes_starkv},
            "reduction": bytes_base / bytes_starkv if bytes_base and bytes_starkv else None,
        },
        "calibration": {
            "source": calibration.source,
            "samples": options.calibration_samples,
            "seq_len": options.seq_len,
            "tokens": calibration.tokens,
            "seed": options.seed,
        },
        "metrics": {
            "perplexity": {
                "base": measured.get("perplexity_base"),
                "init": measured.get("perplexity_init"),
                "starkv": measured.get("perplexity_starkv"),
                "data": f"{held_out} held-out blocks of {options.seq_len} tokens that follow the calibration blocks",
                "tokens": held_out * (options.seq_len - 1),
            }
        },
        "validation": {"passed": not problems, "problems": problems},
        "timings_s": timings,
        "command": options.command,
        "environment": _environment(device),
    }


def _learning_report(options: ConvertOptions, measured: dict[str, Any]) -> dict[str, Any]:
    history = measured.get("learn_history") or []
    phase1 = [h for h in history if h["phase"] == 1]
    return {
        "settings": asdict(options.learn),
        "threshold_steps": len(phase1),
        "recovery_steps": len(history) - len(phase1),
        "kd_first": history[0]["kd"] if history else None,
        "kd_last": history[-1]["kd"] if history else None,
        "tokens_per_step": options.learn.batch_size * options.seq_len,
    }


def base_license(source: ModelSource) -> str | None:
    """The base model's license: from GGUF metadata, a local README's front matter, or the Hub's model card."""
    try:
        if source.gguf_file:
            import gguf

            field_ = gguf.GGUFReader(Path(source.path) / source.gguf_file).fields.get("general.license")
            return str(field_.contents()) if field_ is not None else None
        if source.is_local:
            readme = Path(source.path) / "README.md"
            text = readme.read_text() if readme.is_file() else ""
        else:
            from huggingface_hub import hf_hub_download

            text = Path(hf_hub_download(source.path, "README.md")).read_text()
        match = re.search(r"^license:\s*(\S+)\s*$", text.split("\n---", 1)[0], re.MULTILINE)
        return match.group(1) if match else None
    except Exception:  # the license is informative: a missing or unreadable card leaves it unset
        return None


def convert(options: ConvertOptions) -> Path:
    """Converts `options.model` and writes the checkpoint folder; returns its path."""
    start = time.perf_counter()
    check_options(options)
    device = resolve_device(options.device)
    options = resolve_sizes(options, device)
    source = resolve_source(options.model)
    base_config = load_config(source)
    shape = model_shape(base_config)
    skip = parse_skip_layers(options.skip_layers, shape.num_layers)
    make_budget(shape, skip, options.kv_ratio, options.k_ratio, options.v_ratio)  # fail fast
    output = Path(options.output) if options.output else default_output(source, options)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    with _resume_hint(options, output), atomic_output(output, options.overwrite) as staging:
        t = time.perf_counter()
        _log(options, f"loading {source.path}{'/' + source.gguf_file if source.gguf_file else ''} on {device}")
        tokenizer = load_tokenizer(source)
        model = load_model(source, resolve_dtype(options.dtype), device, placement(options, output), base_config)
        dtype = next(model.parameters()).dtype
        t = lap("load", t)

        calibration = calibration_data(
            options.calibration,
            model,
            tokenizer,
            eos_token_id(model, tokenizer),
            options.calibration_samples,
            options.seq_len,
            options.eval_samples,
            options.seed,
            options.progress,
        )
        _log(options, f"calibration: {calibration.source}")
        t = lap("calibration_data", t)
        moments = None
        if options.init == "whitened":
            moments = attention_input_moments(model, calibration.blocks, options.batch_size, options.progress)
        t = lap("statistics", t)
        factors = factorize_model(model, moments, skip, options.damp, options.progress)
        plan = choose_ranks(factors, shape, skip, options)
        t = lap("factorize", t)
        if options.method == "learned":
            learned, measured_init = _learn(model, factors, plan, shape, skip, calibration, output, source, options)
            factors, plan = learned.factors, learned.plan
            t = lap("learn", t)
        _log(options, f"{options.method} ranks keep {plan.ratio(shape):.1%} of the KV cache")

        base_state = full_state_dict(model)
        state = latent_state_dict(base_state, factors, plan, dtype)
        # an offloaded conversion measures and validates on the CPU: the checkpoint's attention reads its
        # up-projection weights directly, which accelerate's offload hooks do not bring in (spreading over GPUs works)
        check_device = "cpu" if options.device_map else device
        kv_quant, quantization = choose_quantization(
            model.config, plan, state, dtype, calibration, check_device, options
        )
        if quantization is not None and quantization["rotated_4bit"]:  # the factors' 4-bit channels, before the cast
            state = latent_state_dict(base_state, factors, plan, dtype, kv_quant)
        del factors, moments, base_state
        if options.kv_bits == "auto":
            t = lap("quant_split", t)
        config = starkv_config(model.config, plan, dtype, kv_quant)
        write_checkpoint(staging, config, state, tokenizer, model.generation_config)
        plot_ranks(plan, shape, staging / RANKS_PLOT, f"{options.method} ranks, kv-ratio {plan.ratio(shape):.3f}")
        del state
        t = lap("export", t)

        eval_blocks = calibration.eval_blocks if len(calibration.eval_blocks) else calibration.blocks[-1:]
        _log(options, "validating the checkpoint as users load it")
        measured, problems = validate_checkpoint(staging, model, eval_blocks, check_device, options.progress)
        if options.method == "learned":
            measured["perplexity_init"] = measured_init
            measured["learn_history"] = learned.history
        t = lap("validate", t)
        timings["total"] = round(time.perf_counter() - start, 2)
        report = build_report(
            options,
            source,
            base_config,
            plan,
            shape,
            skip,
            calibration,
            measured,
            problems,
            timings,
            dtype,
            device,
            base_license(source),
            quantization,
        )
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (staging / "README.md").write_text(render_model_card(report, options.push_to_hub))

    shutil.rmtree(offload_folder(output), ignore_errors=True)
    if options.method == "learned" and not problems:
        shutil.rmtree(state_folder(output), ignore_errors=True)
    _log(options, f"wrote {output} in {timings['total']:.0f} s")
    if problems:
        raise ConversionFailed(f"{output} failed validation: {'; '.join(problems)}")
    if options.push_to_hub:
        url = push_to_hub(output, options.push_to_hub, private=options.private)
        _log(options, f"pushed to {url}")
    return output


@contextmanager
def _resume_hint(options: ConvertOptions, output: Path) -> Iterator[None]:
    """On any failure, removes the offload folder; on Ctrl-C, also says where the learned method's training state
    was kept (the output folder itself is never half-written)."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(offload_folder(output), ignore_errors=True)
        state = state_folder(output)
        if isinstance(e, KeyboardInterrupt) and options.method == "learned" and (state / "state.json").exists():
            raise KeyboardInterrupt(f"; training state kept in {state}: add --resume to continue") from None
        raise


def _learn(
    model: Any,
    factors: dict[int, LayerFactors],
    energy_plan: RankPlan,
    shape: ModelShape,
    skip: list[int],
    calibration: Any,
    output: Path,
    source: ModelSource,
    options: ConvertOptions,
) -> tuple[Any, float | None]:
    """Runs the learned method; also measures the held-out perplexity of its whitened-energy starting point."""
    budgets = side_budgets(make_budget(shape, skip, options.kv_ratio, options.k_ratio, options.v_ratio), energy_plan)
    eval_blocks = calibration.eval_blocks if len(calibration.eval_blocks) else calibration.blocks[-1:]
    state_dir = state_folder(output)
    _log(options, f"learning ranks: keys {budgets.k}, values {budgets.v} values per token")
    _log(options, f"training state goes to {state_dir} (continue an interrupted run with --resume)")
    learned = learn_ranks(
        model,
        factors,
        shape,
        budgets,
        calibration.blocks,
        options.learn,
        state_dir=state_dir,
        resume=options.resume,
        settings=learn_settings(options, source),
        progress=options.progress,
        init_plan=energy_plan,
        eval_blocks=eval_blocks,
    )
    return learned, learned.perplexity_init
