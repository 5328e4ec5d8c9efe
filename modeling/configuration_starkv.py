"""Configuration of STAR-KV checkpoints: a Llama-family config plus the ranks of the latent KV cache."""

from transformers.models.llama.configuration_llama import LlamaConfig

SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class StarKVConfig(LlamaConfig):
    r"""
    Config of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) whose key/value projections are factorized.

    For a compressed layer `i`, KV head `j` caches a key latent of width `kv_k_ranks[i][j]` and the layer caches one
    value latent of width `kv_v_ranks[i]` shared by all heads. A layer whose entries are `None` is kept as in the base
    model and caches plain keys and values.

    Args:
        base_model_type (`str`): `model_type` of the model this checkpoint was converted from.
        attention_out_bias (`bool`, *optional*): whether `o_proj` has a bias; defaults to `attention_bias`
            (Qwen2 has q/k/v biases but none on `o_proj`).
        qk_norm (`bool`): per-head RMSNorm on queries and keys before RoPE (Qwen3).
        sliding_window (`int`, *optional*): window of the layers whose `layer_types` entry is "sliding_attention".
        layer_types (`list[str]`, *optional*): "full_attention" or "sliding_attention" per layer.
        kv_k_ranks (`list[list[int] | None]`, *optional*): per layer, the key rank of each KV head.
        kv_v_ranks (`list[int | None]`, *optional*): per layer, the joint value rank.
        kv_quant (`dict`, *optional*): quantized latents: `{"group": g, "k_n8": [[...] | None per layer],
            "v_n8": [int | None per layer], "align": a}`, the number of leading channels of each block kept in 8 bits
            (the rest in 4), with fp16 scales per token and group of g channels, in cache rows whose blocks start at
            multiples of a bytes (default 4). None caches the latents in the model dtype.
    """

    model_type = "starkv"

    base_model_type: str = "llama"
    attention_out_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    kv_k_ranks: list | None = None
    kv_v_ranks: list | None = None
    kv_quant: dict | None = None

    def __post_init__(self, **kwargs):
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if self.kv_k_ranks is None:
            self.kv_k_ranks = [None] * self.num_hidden_layers
        if self.kv_v_ranks is None:
            self.kv_v_ranks = [None] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.validate_architecture()  # a checkpoint with inconsistent ranks fails here, with the layer named

    def validate_architecture(self):
        """Checks the family and that the ranks fit the model's shapes."""
        super().validate_architecture()
        if self.base_model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(f"base_model_type {self.base_model_type!r} is not one of {SUPPORTED_BASE_MODEL_TYPES}")
        n_layers, n_kv, head_dim = self.num_hidden_layers, self.num_key_value_heads, self.head_dim
        for name, value in (("kv_k_ranks", self.kv_k_ranks), ("kv_v_ranks", self.kv_v_ranks)):
            if len(value) != n_layers:
                raise ValueError(f"{name} has {len(value)} entries for {n_layers} layers")
        if len(self.layer_types) != n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {n_layers} layers")
        max_v = min(n_kv * head_dim, self.hidden_size)
        for i, (k_ranks, v_rank) in enumerate(zip(self.kv_k_ranks, self.kv_v_ranks)):
            if (k_ranks is None) != (v_rank is None):
                raise ValueError(f"layer {i}: kv_k_ranks and kv_v_ranks must both be set or both be None")
            if k_ranks is None:
                continue
            if len(k_ranks) != n_kv or not all(1 <= r <= min(head_dim, self.hidden_size) for r in k_ranks):
                raise ValueError(f"layer {i}: kv_k_ranks {k_ranks} must hold {n_kv} ranks in [1, {head_dim}]")
            if not 1 <= v_rank <= max_v:
                raise ValueError(f"layer {i}: kv_v_ranks {v_rank} must be in [1, {max_v}]")
            if self.kv_quant is not None:
                align = self.kv_quant.get("align", 1)  # (configs from before it: compact rows)
                if isinstance(align, bool) or not isinstance(align, int) or align not in (1, 2, 4, 8, 16):
                    raise ValueError(f"kv_quant align {align!r} must be the integer 1, 2, 4, 8 or 16 (bytes)")
                k_n8, v_n8 = self.kv_quant["k_n8"][i], self.kv_quant["v_n8"][i]
                if len(k_n8) != n_kv or not all(0 <= a <= r for a, r in zip(k_n8, k_ranks)) or not 0 <= v_n8 <= v_rank:
                    raise ValueError(f"layer {i}: kv_quant 8-bit channels {k_n8}, {v_n8} do not fit its ranks")

    def is_compressed(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` caches latents (True) or plain keys and values (False)."""
        return self.kv_k_ranks[layer_idx] is not None

    def cache_floats_per_token(self) -> int:
        """Cached values per token over all layers (latents for compressed layers, K and V otherwise)."""
        full = 2 * self.num_key_value_heads * self.head_dim
        return sum(sum(k) + v if k is not None else full for k, v in zip(self.kv_k_ranks, self.kv_v_ranks))


__all__ = ["StarKVConfig"]
