"""The model families starkv converts, and how each maps onto a STAR-KV config."""

from typing import Any

from .errors import StarKVError

SUPPORTED = {
    "llama": "Llama (Llama-2, Llama-3.x, SmolLM)",
    "mistral": "Mistral",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
}

# Fields every family shares with LlamaConfig, copied as they are.
_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


def supported_families_text() -> str:
    return ", ".join(f"{v} [{k}]" for k, v in SUPPORTED.items())


def check_supported(config: Any) -> None:
    """Raises StarKVError unless `config` is a decoder of a supported family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise StarKVError(
            f"model_type {model_type!r} is not supported: starkv converts Llama-family decoders, namely "
            f"{supported_families_text()}"
        )
    if getattr(config, "num_key_value_heads", None) is None:
        return
    if config.num_attention_heads % config.num_key_value_heads:
        raise StarKVError(
            f"{config.num_attention_heads} query heads are not a multiple of {config.num_key_value_heads} KV heads"
        )


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def starkv_config_kwargs(config: Any) -> dict[str, Any]:
    """Keyword arguments of a StarKVConfig (without ranks) that reproduce the base model `config`."""
    check_supported(config)
    kwargs = {name: getattr(config, name) for name in _COMMON_FIELDS if hasattr(config, name)}
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = config.num_attention_heads
    kwargs["head_dim"] = head_dim(config)
    kwargs["base_model_type"] = config.model_type
    kwargs["mlp_bias"] = bool(getattr(config, "mlp_bias", False))
    if config.model_type == "qwen2":  # q/k/v projections have biases, o_proj has none
        kwargs["attention_bias"], kwargs["attention_out_bias"] = True, False
    else:
        kwargs["attention_bias"] = bool(getattr(config, "attention_bias", False))
        kwargs["attention_out_bias"] = kwargs["attention_bias"]
    kwargs["qk_norm"] = config.model_type == "qwen3"
    kwargs["sliding_window"] = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if kwargs["sliding_window"] is None:
        layer_types = None
    elif layer_types is None:
        layer_types = ["sliding_attention"] * config.num_hidden_layers
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise StarKVError(f"layer types {sorted(unknown)} are not supported (only full and sliding attention)")
        if "sliding_attention" not in layer_types:
            kwargs["sliding_window"], layer_types = None, None
    kwargs["layer_types"] = layer_types
    return kwargs
