"""Assembling a STAR-KV model from a base model, its factorizations and a rank plan."""

from typing import Any

import torch

from .factorize import LayerFactors
from .families import starkv_config_kwargs
from .ranks import RankPlan
from .remote_code import import_remote
from .rotation import rotate_block

AUTO_MAP = {
    "AutoConfig": "configuration_starkv.StarKVConfig",
    "AutoModelForCausalLM": "modeling_starkv.StarKVForCausalLM",
}


def starkv_config(base_config: Any, plan: RankPlan, dtype: torch.dtype, kv_quant: dict | None = None) -> Any:
    """The StarKVConfig of the converted model: the base architecture plus the ranks (and the latents' bits)."""
    config_class = import_remote("configuration_starkv").StarKVConfig
    config = config_class(
        **starkv_config_kwargs(base_config),
        kv_k_ranks=plan.k,
        kv_v_ranks=plan.v,
        kv_quant=kv_quant,
        architectures=["StarKVForCausalLM"],
        auto_map=dict(AUTO_MAP),
        dtype=str(dtype).removeprefix("torch."),
    )
    config._attn_implementation = "sdpa"
    return config


def latent_state_dict(
    base_state_dict: dict[str, torch.Tensor],
    factors: dict[int, LayerFactors],
    plan: RankPlan,
    dtype: torch.dtype,
    kv_quant: dict | None = None,
) -> dict[str, torch.Tensor]:
    """
    The converted model's tensors: the base model's, except that each compressed layer's k_proj/v_proj become
    k_a_proj/k_b_proj/v_a_proj/v_b_proj (factors cast to `dtype`; biases kept as they were). With `kv_quant`, each
    block's 4-bit channels are rotated first (`rotation.rotate_block`, before the cast, so 16-bit factors are
    rounded once).
    """
    state = dict(base_state_dict)
    for layer, k_ranks in enumerate(plan.k):
        if k_ranks is None:
            continue
        prefix = f"model.layers.{layer}.self_attn."
        for name in ("k_proj.weight", "v_proj.weight"):
            del state[prefix + name]
        k_bias, v_bias = state.pop(prefix + "k_proj.bias", None), state.pop(prefix + "v_proj.bias", None)
        ups, downs = zip(*(f.truncated(r) for f, r in zip(factors[layer].k, k_ranks)))
        k_down, k_up = torch.cat(downs, dim=0).double(), torch.cat(ups, dim=1).double()  # (factors are float64)
        v_up, v_down = (t.double().clone() for t in factors[layer].v.truncated(plan.v[layer]))
        if kv_quant is not None:
            starts = [sum(k_ranks[:j]) for j in range(len(k_ranks))]
            for start, rank, n8 in zip(starts, k_ranks, kv_quant["k_n8"][layer]):
                rotate_block(k_down, k_up, start, rank, n8)
            rotate_block(v_down, v_up, 0, plan.v[layer], kv_quant["v_n8"][layer])
        state[prefix + "k_a_proj.weight"] = k_down.to(dtype).contiguous()
        state[prefix + "k_b_proj.weight"] = k_up.to(dtype).contiguous()
        state[prefix + "v_a_proj.weight"] = v_down.to(dtype).contiguous()
        state[prefix + "v_b_proj.weight"] = v_up.to(dtype).contiguous()
        if k_bias is not None:
            state[prefix + "k_b_proj.bias"] = k_bias
        if v_bias is not None:
            state[prefix + "v_b_proj.bias"] = v_bias
    return state


def build_model(config: Any, state_dict: dict[str, torch.Tensor], device: torch.device | str) -> torch.nn.Module:
    """A StarKVForCausalLM holding exactly `state_dict`, in eval mode, without a round trip through disk."""
    model_class = import_remote("modeling_starkv").StarKVForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    state = {k: v.to(device) for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model.eval()
