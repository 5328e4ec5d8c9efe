"""Checking a written checkpoint the way a user loads it, and measuring it against its base model."""

import math
from pathlib import Path
from typing import Any

import torch

from .evaluate import kv_cache_bytes_per_token, perplexity
from .placement import full_state_dict


def load_checkpoint(folder: Path, device: str) -> tuple[Any, dict[str, list]]:
    """The checkpoint loaded with plain transformers and its remote code, plus transformers' loading report."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": True, "dtype": "auto", "output_loading_info": True}
    if device != "cpu":
        kwargs["device_map"] = device
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return model.eval(), info


def unchanged_tensor_problems(model: Any, base_state: dict[str, torch.Tensor]) -> list[str]:
    """Tensors the checkpoint shares by name with the base model that are not bit-identical to it."""
    problems = []
    for name, tensor in full_state_dict(model).items():
        if name in base_state and not torch.equal(tensor.cpu(), base_state[name].cpu()):
            problems.append(f"{name} differs from the base model")
    return problems


def validate_checkpoint(
    folder: Path,
    base_model: Any,
    eval_blocks: torch.Tensor,
    device: str,
    progress: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Loads `folder` as a user would and measures it; returns (measurements, problems found)."""
    problems: list[str] = []
    try:
        model, info = load_checkpoint(folder, device)
    except Exception as e:  # anything that stops a user from loading it
        return {}, [f"the checkpoint does not load: {type(e).__name__}: {str(e).strip().splitlines()[0]}"]
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            problems.append(f"{kind}: {sorted(map(str, info[kind]))[:5]}")
    problems += unchanged_tensor_problems(model, full_state_dict(base_model))[:5]

    sample = eval_blocks[:1]
    measured = {
        "perplexity_base": perplexity(base_model, eval_blocks, progress=progress),
        "perplexity_starkv": perplexity(model, eval_blocks, progress=progress),
        "bytes_per_token_base": kv_cache_bytes_per_token(base_model, sample),
        "bytes_per_token_starkv": kv_cache_bytes_per_token(model, sample),
    }
    if not math.isfinite(measured["perplexity_starkv"]):
        problems.append("the converted model's perplexity is not finite")
    del model
    return measured, problems
