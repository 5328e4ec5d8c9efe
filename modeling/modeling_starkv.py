"""
STAR-KV model: a Llama-family decoder whose compressed layers cache low-rank key/value latents.

Keys are cached per KV head as `z_k = A_j x` and rebuilt as `B_j z_k` (+ bias, + Qwen3's k-norm), then rotated at
their own positions when read. Values are cached as one joint latent `z_v = A_v x`; decode aggregates `z_v` under the
softmax and up-projects once per query head. Prefill rebuilds keys and values and uses the attention interface (SDPA),
a slice of sequences at a time when rebuilding them for the whole batch would take more than PREFILL_REBUILD_BYTES.
Layers kept full are plain attention layers with a plain cache.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_starkv import StarKVCache, StarKVStaticCache
from .configuration_starkv import StarKVConfig
from .latent_decode import latent_decode_attention, use_decode_kernel
from .latent_ops import apply_rope, latent_attention, rebuild_keys, rebuild_values
from .latent_quant import LatentCodec, row_align
from .latent_quantize import encode_latents

# Most bytes of keys and values a prefill chunk rebuilds at once (a slice of sequences; at least one). Small: SDPA on
# CUDA with a mask repeats them over the query groups (transformers' repeat_kv), 4x more for Llama-3.1-8B.
PREFILL_REBUILD_BYTES = 1 << 28
# The model outputs' cache field: `cache` from transformers 5.24, `past_key_values` before (read by its own name: the
# old one still works but warns)
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class KeyUpProjection(nn.Module):
    """Per-KV-head key up-projections with ragged ranks, side by side in one (head_dim, sum(ranks)) weight."""

    def __init__(self, ranks: list[int], head_dim: int, bias: bool):
        super().__init__()
        self.ranks = list(ranks)
        self.weight = nn.Parameter(torch.empty(head_dim, sum(self.ranks)))
        self.bias = nn.Parameter(torch.empty(len(self.ranks) * head_dim)) if bias else None

    def forward(self, key_latents: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """(batch, tokens, sum(ranks)) latents -> (batch, num_kv_heads, tokens, head_dim) keys before RoPE."""
        return rebuild_keys(key_latents, self.weight, self.ranks, self.bias, norm)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, head_dim={self.weight.shape[0]}, bias={self.bias is not None}"


class StarKVAttention(nn.Module):
    """Grouped-query attention whose keys and values are cached as low-rank latents (or plainly, if kept full)."""

    def __init__(self, config: StarKVConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.is_compressed = config.is_compressed(layer_idx)
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

        hidden, kv_dim = config.hidden_size, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        if self.is_compressed:
            k_ranks, v_rank = config.kv_k_ranks[layer_idx], config.kv_v_ranks[layer_idx]
            self.k_a_proj = nn.Linear(hidden, sum(k_ranks), bias=False)
            self.k_b_proj = KeyUpProjection(k_ranks, self.head_dim, bias=config.attention_bias)
            self.v_a_proj = nn.Linear(hidden, v_rank, bias=False)
            self.v_b_proj = nn.Linear(v_rank, kv_dim, bias=config.attention_bias)
            self.codecs = None  # quantized latents: stored as uint8 rows of codes and scales, attended dequantized
            if config.kv_quant is not None:
                group, align = config.kv_quant["group"], row_align(config.kv_quant)
                self.codecs = (
                    LatentCodec(k_ranks, config.kv_quant["k_n8"][layer_idx], group, align),
                    LatentCodec([v_rank], [config.kv_quant["v_n8"][layer_idx]], group, align),
                )
        else:
            self.k_proj = nn.Linear(hidden, kv_dim, bias=config.attention_bias)
            self.v_proj = nn.Linear(hidden, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: StarKVCache | None = None,
        key_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope: tuple[torch.Tensor, float] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)

        query = self.q_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query = self.q_norm(query)
        query = apply_rope(query.transpose(1, 2), cos, sin)

        if self.is_compressed and rope is not None:  # a decode step through the Triton kernel
            attn_output = self._kernel_decode(hidden_states, query, attention_mask, past_key_values, rope)
            return self.o_proj(attn_output.reshape(*input_shape, -1)), None
        if not self.is_compressed:
            keys, values = self._plain_keys_values(hidden_states, hidden_shape, cos, sin, past_key_values)
            attn_output, attn_weights = self._attend(query, keys, values, attention_mask, **kwargs)
            return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights

        key_latents, value_latents = self._new_latents(hidden_states)
        if past_key_values is not None:
            key_latents, value_latents = past_key_values.update_latents(key_latents, value_latents, self.layer_idx)
        # a sliding-window layer reads only the latest tokens: the positions' tail
        tokens = key_latents.shape[1]
        cos_k, sin_k = (t[:, -tokens:].unsqueeze(1) for t in key_position_embeddings or position_embeddings)
        if input_shape[1] > 1:  # prefill (or a chunk of it): attention over rebuilt keys and values
            attn_output, attn_weights = self._prefill_attention(
                query, key_latents, value_latents, cos_k, sin_k, attention_mask, **kwargs
            )
        else:  # decode: values stay latent
            keys = self._rebuild_keys(key_latents, cos_k, sin_k, query.dtype)
            value_latents = self._decoded(value_latents, 1, query.dtype)
            attn_output = latent_attention(
                query, keys, value_latents, self.v_b_proj.weight, self.v_b_proj.bias, attention_mask, self.scaling
            )
            attn_weights = None
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights

    def _attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The config's attention interface (SDPA, eager...) over full keys and values."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            keys,
            values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )

    def _prefill_attention(
        self,
        query: torch.Tensor,
        key_latents: torch.Tensor,
        value_latents: torch.Tensor,
        cos_k: torch.Tensor,
        sin_k: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Attention of a prefill chunk over the keys and values rebuilt from every held token's latents (as stored:
        quantized rows are decoded here). Rebuilt for the whole batch they would take `batch * tokens * kv_heads *
        head_dim * 2` elements (5 GB per layer at 38 x 32K on Llama-3.1-8B); beyond PREFILL_REBUILD_BYTES they are
        rebuilt and attended a slice of sequences at a time, slicing the mask too. A mask that is not a 4-D tensor
        (`(batch or 1, 1, q, kv)`: sdpa's bool or eager's float mask; None is fine too) is not sliced: one slice.
        """
        batch, tokens = key_latents.shape[:2]
        per_sequence = 2 * tokens * self.num_key_value_heads * self.head_dim * query.element_size()
        sliceable = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4)
        step = max(1, PREFILL_REBUILD_BYTES // per_sequence) if sliceable else batch

        def rows(t, start):  # the sequences of a slice; a tensor broadcast over the batch (batch 1) is kept whole
            return t[start : start + step] if isinstance(t, torch.Tensor) and t.shape[0] == batch else t

        outputs, weights = [], []
        for start in range(0, batch, step):
            keys = self._rebuild_keys(rows(key_latents, start), rows(cos_k, start), rows(sin_k, start), query.dtype)
            values = rebuild_values(
                self._decoded(rows(value_latents, start), 1, query.dtype),
                self.v_b_proj.weight,
                self.v_b_proj.bias,
                self.num_key_value_heads,
            )
            sliced = {k: rows(v, start) if k == "position_ids" else v for k, v in kwargs.items()}  # (batch, q)
            out, w = self._attend(rows(query, start), keys, values, rows(attention_mask, start), **sliced)
            outputs.append(out)
            weights.append(w)
        if len(outputs) == 1:
            return outputs[0], weights[0]
        return torch.cat(outputs), None if weights[0] is None else torch.cat(weights)

    def _kernel_decode(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: StarKVCache,
        rope: tuple[torch.Tensor, float, tuple[torch.Tensor, torch.Tensor] | None],
    ) -> torch.Tensor:
        """One decode query per sequence over the cached latents, fused in Triton; returns (batch, heads, head_dim)."""
        key_latents, value_latents = past_key_values.update_latents(*self._new_latents(hidden_states), self.layer_idx)
        tokens = key_latents.shape[1]
        valid = None
        if attention_mask is not None:
            mask = attention_mask[:, 0, -1, -tokens:]
            valid = mask if mask.dtype == torch.bool else mask == 0
        inv_freq, rope_scale, tables = rope
        if tables is not None:  # a sliding-window layer reads only the latest tokens
            tables = tuple(t[:, -tokens:] for t in tables)
        return latent_decode_attention(
            query[:, :, 0],
            key_latents,
            value_latents,
            past_key_values.positions[:, -tokens:],
            valid,
            self.k_b_proj.weight,
            self.k_b_proj.ranks,
            self.k_b_proj.bias,
            self.k_norm if self.config.qk_norm else None,
            inv_freq,
            rope_scale,
            self.v_b_proj.weight,
            self.v_b_proj.bias,
            self.scaling,
            tables=tables,
            codecs=self.codecs,
        )

    def _new_latents(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value latents of new tokens, as the cache stores them (quantized: the codecs' uint8 rows)."""
        key_latents, value_latents = self.k_a_proj(hidden_states), self.v_a_proj(hidden_states)
        if self.codecs is None:
            return key_latents, value_latents
        return encode_latents(self.codecs[0], key_latents), encode_latents(self.codecs[1], value_latents)

    def _decoded(self, latents: torch.Tensor, which: int, dtype: torch.dtype) -> torch.Tensor:
        """Stored latents as attention reads them: quantized rows (codec `which`: 0 keys, 1 values) dequantized."""
        return latents if self.codecs is None else self.codecs[which].decode(latents, dtype)

    def _rebuild_keys(
        self, key_latents: torch.Tensor, cos_k: torch.Tensor, sin_k: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Rotated keys (batch, num_kv_heads, tokens, head_dim) from stored key latents (batch, tokens, ...)."""
        keys = self.k_b_proj(self._decoded(key_latents, 0, dtype), self.k_norm if self.config.qk_norm else None)
        return apply_rope(keys, cos_k, sin_k)

    def _plain_keys_values(
        self,
        hidden_states: torch.Tensor,
        hidden_shape: tuple[int, ...],
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key_values: StarKVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a layer kept full, as in the base model."""
        keys = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            keys = self.k_norm(keys)
        keys = apply_rope(keys.transpose(1, 2), cos, sin)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            keys, values = past_key_values.update(keys, values, self.layer_idx)
        return keys, values


class StarKVDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: StarKVConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = StarKVAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: StarKVCache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            key_position_embeddings=key_position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class StarKVPreTrainedModel(PreTrainedModel):
    config_class = StarKVConfig
    config: StarKVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StarKVDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": StarKVDecoderLayer,
        "attentions": StarKVAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, KeyUpProjection):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class StarKVModel(StarKVPreTrainedModel):
    def __init__(self, config: StarKVConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [StarKVDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: StarKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: StarKVCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24 says `cache`
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = StarKVCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, StarKVCache):
            raise TypeError(
                f"STAR-KV models cache latents and need a StarKVCache, not {type(past_key_values).__name__}: "
                "let generate() create it, or pass StarKVCache(model.config) from this checkpoint's cache_starkv.py"
            )

        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # positional: the cache argument is `past_key_values` before transformers 5.24 and `cache` after
        if isinstance(attention_mask, dict):  # made by generate() for compileable (static) caches
            causal_mask_mapping = attention_mask
        else:
            mask_args = (self.config, inputs_embeds, attention_mask, past_key_values)
            causal_mask_mapping = {"full_attention": create_causal_mask(*mask_args, position_ids=position_ids)}
            if "sliding_attention" in self.config.layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(
                    *mask_args, position_ids=position_ids
                )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        key_position_embeddings, rope = position_embeddings, None
        if past_key_values is not None:
            dtype, kernel = inputs_embeds.dtype, use_decode_kernel(inputs_embeds.device)
            inv_freq, scale = self.rotary_emb.inv_freq, float(self.rotary_emb.attention_scaling)
            # a 16-bit model's kernel reads RoPE tables of the cached positions, kept by the cache from then on
            rope_args = (inv_freq, scale, dtype) if kernel and dtype != torch.float32 else None
            key_positions = past_key_values.update_positions(position_ids, inputs_embeds.shape[0], rope_args)
            # (a static cache's length is a tensor: no branch on it, or torch.compile breaks the graph here)
            if kernel and inputs_embeds.shape[1] == 1:
                rope = (inv_freq, scale, past_key_values.rope_tables if rope_args else None)
            if rope is None and key_positions.shape[1] != inputs_embeds.shape[1]:  # earlier tokens, or static slots
                key_position_embeddings = self.rotary_emb(hidden_states, position_ids=key_positions)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[decoder_layer.self_attn.layer_idx]],
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                key_position_embeddings=key_position_embeddings,
                rope=rope,
                position_ids=position_ids,
                **kwargs,
            )

        if past_key_values is not None:
            past_key_values.trim_positions()
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(hidden_states, past_key_values)  # the cache field's name depends on the version


class StarKVForCausalLM(StarKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: StarKVConfig):
        super().__init__(config)
        self.model = StarKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: StarKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: StarKVCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        cache_out = getattr(outputs, _CACHE_FIELD)
        return CausalLMOutputWithPast(loss, logits, cache_out, outputs.hidden_states, outputs.attentions)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """
        generate() gets a StarKVCache where transformers would create a DynamicCache for this model, and a
        StarKVStaticCache of the same length where it would create a StaticCache (`cache_implementation="static"`).
        """
        keys = ("cache", "past_key_values")  # the name changed in transformers 5.24
        given = {key: model_kwargs.get(key) for key in keys}
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key in keys:
            made = model_kwargs.get(key)
            if given[key] is None and type(made) is DynamicCache:
                model_kwargs[key] = StarKVCache(self.config)
            elif given[key] is None and type(made) is StaticCache:  # full layers have the length generate() chose
                full = [layer.max_cache_len for layer in made.layers if not layer.is_sliding]
                length = full[0] if full else kwargs.get("max_cache_length", args[-1] if args else None)
                model_kwargs[key] = StarKVStaticCache(self.config, length)

    def _get_static_cache_init_shape(self) -> None:
        """
        None: generate() must not allocate the StaticCache it makes (for chunked prefill it would, at full keys and
        values for every token), since `_prepare_cache_for_generation` replaces it with a StarKVStaticCache.
        """
        return None


__all__ = ["StarKVForCausalLM", "StarKVModel", "StarKVPreTrainedModel"]
