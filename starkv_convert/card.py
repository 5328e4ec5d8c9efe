"""The model card (README.md with Hub metadata) of a converted checkpoint, rendered from its report."""

from typing import Any

TAGS = ["starkv", "kv-cache-compression", "low-rank", "custom_code"]


def _front_matter(report: dict[str, Any]) -> str:
    base = report["base_model"]
    lines = ["---"]
    if base.get("id"):
        lines.append(f"base_model: {base['id']}")
    lines.append("library_name: transformers")
    if base.get("license"):
        lines.append(f"license: {base['license']}")
    lines.append("pipeline_tag: text-generation")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in TAGS]
    lines.append("---")
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ranks_table(report: dict[str, Any]) -> str:
    quant = report.get("quantization")
    head = "| layer | K rank per KV head | V rank (joint) | cached values per token |"
    rows = [
        head + " 8-bit channels (K per head; V) |" if quant else head,
        "|---|---|---|---|" + ("---|" if quant else ""),
    ]
    full = report["kv_cache"]["values_per_token"]["base"] // len(report["ranks"]["k"])
    for layer, (k, v) in enumerate(zip(report["ranks"]["k"], report["ranks"]["v"])):
        if k is None:
            rows.append(f"| {layer} | kept full | kept full | {full} of {full} |" + (" none |" if quant else ""))
        else:
            row = f"| {layer} | {', '.join(map(str, k))} | {v} | {sum(k) + v} of {full} |"
            if quant:
                row += f" {', '.join(map(str, quant['k_n8'][layer]))}; {quant['v_n8'][layer]} |"
            rows.append(row)
    return "\n".join(rows)


def render_model_card(report: dict[str, Any], repo_id: str | None = None) -> str:
    """README.md text: what was converted, how to use it, and every number that was measured."""
    base, budget, cache = report["base_model"], report["budget"], report["kv_cache"]
    ppl, calib, validation = report["metrics"]["perplexity"], report["calibration"], report["validation"]
    name = base.get("id") or base["source"]
    link = f"[{name}](https://huggingface.co/{name})" if base.get("id") else f"`{name}`"
    repo = repo_id or "PATH_OR_REPO_ID"
    kept = budget["kept_ratio"]
    method = {
        "learned": "learned soft thresholds with knowledge distillation from the base model (STAR-KV), started "
        "from the whitened factorization",
        "energy": "whitened spectral energy, allocated across all heads and layers",
        "uniform": "uniform",
    }
    return f"""{_front_matter(report)}

# {name.split("/")[-1]} with a STAR-KV latent KV cache ({kept:.0%} of the KV cache kept)

This is {link} converted by starkv: its attention caches low-rank key and value
latents instead of full keys and values. Keys are factored per KV head and rebuilt (and rotated by RoPE) when read;
values are factored jointly over heads and aggregated in latent space before one up-projection per query head.
Only the key/value projections differ from the base model; every other tensor is bit-identical to it.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

The remote code needs only `torch` and `transformers` (>= 5.17); it runs on CPU and GPU in float32, bfloat16 and
float16, and works with `generate()` (greedy, sampling, beam search, padded batches, streaming).

## KV cache (measured)

| | base model | STAR-KV |
|---|---|---|
| cached values per token (all layers) | {_fmt(cache["values_per_token"]["base"])} | {_fmt(cache["values_per_token"]["starkv"])} |
| cache bytes per token, measured after a forward pass ({base["dtype"]}) | {_fmt(cache["bytes_per_token"]["base"], 0)} | {_fmt(cache["bytes_per_token"]["starkv"], 0)} |
| reduction | 1x | {_fmt(cache["reduction"])}x |

{_quantization_section(report)}## Quality (measured)

Perplexity on {ppl["data"]} ({_fmt(ppl["tokens"])} predicted tokens):

{_quality_table(ppl)}

## Ranks

Rank selection: {method.get(budget["method"], budget["method"])}; initialization: {budget["init"]}
(damping {budget["damp"]}); budget: --kv-ratio {budget["kv_ratio"]}{_side_ratios(budget)}{_bits(budget)}; layers kept full:
{budget["skip_layers"] or "none"}.

![ranks per layer and head](ranks.png)

{_ranks_table(report)}
{_learning_section(report)}
## Conversion

- calibration: {calib["source"]} ({_fmt(calib["tokens"])} tokens)
- command: `{report["command"]}`
- starkv {report["starkv_version"]}, torch {report["environment"]["torch"]}, transformers
  {report["environment"]["transformers"]}, on {report["environment"]["device"]}, in {_fmt(report["timings_s"]["total"], 0)} s
- validation: {"passed" if validation["passed"] else "FAILED: " + "; ".join(validation["problems"])}
"""


def _side_ratios(budget: dict[str, Any]) -> str:
    if budget.get("k_ratio") is None:
        return ""
    return f" (keys {budget['k_ratio']}, values {budget['v_ratio']})"


def _quality_table(ppl: dict[str, Any]) -> str:
    if ppl.get("init") is None:
        return f"| base model | STAR-KV |\n|---|---|\n| {_fmt(ppl['base'])} | {_fmt(ppl['starkv'])} |"
    return (
        "| base model | STAR-KV before learning (whitened energy ranks) | STAR-KV (learned) |\n|---|---|---|\n"
        f"| {_fmt(ppl['base'])} | {_fmt(ppl['init'])} | {_fmt(ppl['starkv'])} |"
    )


def _learning_section(report: dict[str, Any]) -> str:
    learning = report.get("learning")
    if not learning:
        return ""
    s, budget = learning["settings"], report["budget"]
    return f"""
### Learning

Budgets: keys {_fmt(budget["k_values"])}, values {_fmt(budget["v_values"])} cached values per token over the
compressed layers. Threshold phase: {learning["threshold_steps"]} steps (at most {s["steps"]}; threshold lr
{s["threshold_lr"]}, compression weight {s["compression"]}, gate sharpness {s["beta"]}); recovery phase:
{learning["recovery_steps"]} steps (lr {s["lr"]}); {_fmt(learning["tokens_per_step"])} tokens per step. KD loss
(KL(base || student), nats per token): {_fmt(learning["kd_first"], 4)} at the first step,
{_fmt(learning["kd_last"], 4)} at the last. Only the key/value factors trained.
"""


def _bits(budget: dict[str, Any]) -> str:
    bits = budget.get("kv_bits", "16")
    if bits == "16":
        return ""
    if bits == "mixed":
        return f"; latents quantized: the leading {budget['kv_8bit_share']:.0%} of each block's channels in 8 bits, the rest in 4"
    if bits == "auto":
        return (
            "; latents quantized: each block's leading channels in 8 bits, as many as calibration statistics chose "
            f"(auto, at the bytes of {budget['kv_8bit_share']:.0%} in 8 bits), the rest in 4"
        )
    return f"; latents quantized to {bits} bits"


def _quantization_section(report: dict[str, Any]) -> str:
    """The quantized latents: how the channels were split into 8 and 4 bits, and what that costs."""
    q = report.get("quantization")
    if not q:
        return ""
    block = q["block_share_8bit"]
    if q["method"] == "auto":
        split = _auto_text(q)
    elif q["method"] == "mixed":
        split = f"mixed: the leading {report['budget']['kv_8bit_share']:.0%} of every block's channels in 8 bits"
    else:
        split = f"every channel in {q['method']} bits"
    return f"""## Quantized latents

The cache stores each block's latents (one KV head's keys, or one layer's values) as int8 codes for its leading
channels (largest singular values first) and packed int4 codes for the rest, with one fp16 scale per token and group of
{q["group"]} channels; each block's codes start at a multiple of {q.get("row_align", 1)} bytes of the cache row (the
decode kernel then reads them in whole words). Split: {split}.{_rotation_text(q)}

| | all blocks | keys | values | per block (min to max) |
|---|---|---|---|---|
| channels in 8 bits | {q["share_8bit"]:.1%} | {q["k_share_8bit"]:.1%} | {q["v_share_8bit"]:.1%} | {block["min"]:.1%} to {block["max"]:.1%} ({q["block_n8"]["min"]} to {q["block_n8"]["max"]} channels) |
| latent bytes per token (all compressed layers) | {_fmt(q["latent_bytes_per_token"])} | | | |

"""


def _rotation_text(q: dict[str, Any]) -> str:
    if not q.get("rotated_4bit"):
        return ""
    text = (
        "\nBefore they are quantized, each block's 4-bit channels are rotated by a fixed orthogonal matrix folded into"
        " its factors: the model is unchanged at full precision, and the energy of the few large channels is spread"
        " over all of them, so that each group's scale fits every channel it covers."
    )
    if q["method"] == "auto":
        text += " The split errors above were measured with this rotation."
    return text


def _auto_text(q: dict[str, Any]) -> str:
    budget, error, calib = q["budget"], q.get("relative_error"), q.get("calibration")
    pooled = {
        "model": "with all blocks sharing them",
        "side": "with the keys keeping mixed's key bytes and the values mixed's value bytes",
    }
    text = (
        "auto: on "
        + (f"{calib['blocks']} calibration blocks ({_fmt(calib['tokens'])} tokens)" if calib else "calibration blocks")
        + ", the converter measured, for every block and every number of 8-bit channels, the error of the rebuilt "
        "keys/values relative to the layer's key/value energy, and chose the split of least summed error (exactly, "
        f"by dynamic programming over bytes) within the bytes per token of `--kv-bits mixed --kv-8bit-share "
        f"{budget['kv_8bit_share']}` ({_fmt(budget['mixed_latent_bytes_per_token'])}; auto takes "
        f"{_fmt(q['latent_bytes_per_token'])}), {pooled.get(budget.get('pooled_over'), 'with all blocks sharing them')}"
    )
    if error:
        a, m = error["auto"], error["mixed"]
        text += (
            f". Summed relative error on those tokens: auto {a['total']:.4g} (keys {a['k']:.4g}, values "
            f"{a['v']:.4g}), mixed {m['total']:.4g} (keys {m['k']:.4g}, values {m['v']:.4g}); all 4 bits "
            f"{error['all_4bit']['total']:.4g}, all 8 bits {error['all_8bit']['total']:.4g}"
        )
    return text
