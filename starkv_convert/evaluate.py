"""Measuring a model: perplexity over token windows, and KV-cache bytes per token read off a real cache."""

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import StarKVError
from .loading import ModelSource, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from .placement import input_device


@torch.no_grad()
def perplexity(model: Any, blocks: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean next-token NLL) over (n, seq_len) independent windows, every position but the first predicted."""
    device = input_device(model)
    nll, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc="perplexity", unit="window", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def cache_nbytes(cache: Any) -> int:
    """Bytes of every per-token tensor a transformers Cache holds (its layers' and its own)."""
    holders = [*getattr(cache, "layers", []), cache]
    tensors = [v for h in holders for v in vars(h).values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def kv_cache_bytes_per_token(model: Any, input_ids: torch.Tensor) -> float:
    """Cache bytes per token after one forward pass over `input_ids` (batch, tokens) with use_cache=True."""
    out = model(input_ids=input_ids.to(input_device(model)), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # `cache` from transformers 5.24
    return cache_nbytes(cache) / input_ids.numel()


def is_starkv_checkpoint(source: ModelSource) -> bool:
    """Whether the model's config.json names the starkv model type (then it needs its remote code)."""
    if source.gguf_file:
        return False
    try:
        if source.is_local:
            config_file = Path(source.path) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(source.path, "config.json"))
        return json.loads(config_file.read_text()).get("model_type") == "starkv"
    except Exception as e:
        raise StarKVError(f"could not read the config of {source.path}: {type(e).__name__}: {e}") from None


def load_for_eval(model: str | None, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any, ModelSource]:
    """Any causal LM (a STAR-KV checkpoint is loaded with its remote code) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(model)
    device = resolve_device(device)
    starkv = is_starkv_checkpoint(source)
    kwargs: dict[str, Any] = {
        **source.load_kwargs(),
        "dtype": resolve_dtype(dtype) or "auto",
        "trust_remote_code": starkv,
    }
    if device != "cpu":
        kwargs["device_map"] = device
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except Exception as e:  # missing, truncated or mismatched files, or a bad config
        raise StarKVError(f"could not load {model}: {str(e).strip().splitlines()[0]}") from None
    return loaded.eval(), load_tokenizer(source, trust_remote_code=starkv), source


def text_windows(tokenizer: Any, text_file: str, seq_len: int, windows: int, start: int) -> torch.Tensor:
    """(windows, seq_len) consecutive token windows of the tokenized file, from token `start`."""
    path = Path(text_file)
    if not path.is_file():
        raise StarKVError(f"--text {text_file} not found: give a UTF-8 text file")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
    end = start + windows * seq_len
    if end > len(ids):
        raise StarKVError(
            f"{text_file} has {len(ids)} tokens, fewer than --start {start} + {windows} windows x {seq_len}: "
            "lower --windows, --seq-len or --start"
        )
    return torch.tensor(ids[start:end], dtype=torch.long).view(windows, seq_len)


def evaluate(
    model: str | None,
    text: str,
    seq_len: int = 512,
    windows: int = 20,
    start: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity and measured KV-cache bytes per token of a base or STAR-KV model on a text file."""
    loaded, tokenizer, source = load_for_eval(model, dtype, device)
    blocks = text_windows(tokenizer, text, seq_len, windows, start)
    return {
        "model": model or str(Path(source.path) / source.gguf_file),
        "perplexity": perplexity(loaded, blocks, progress=progress),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(loaded, blocks[:1]),
        "tokens_evaluated": int(blocks[:, 1:].numel()),
        "windows": windows,
        "seq_len": seq_len,
        "start": start,
        "text": str(text),
        "dtype": str(next(loaded.parameters()).dtype).removeprefix("torch."),
        "device": str(next(loaded.parameters()).device),
    }
