"""The STAR-KV cache: low-rank key/value latents per layer plus the positions of the cached tokens."""

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class LatentLayer(DynamicLayer):
    """
    Cache of one compressed layer. `keys` holds the key latents (batch, 1, tokens, sum of the per-head key ranks) and
    `values` the joint value latents (batch, 1, tokens, value rank): one "head" of latents, tokens on axis -2 as in
    `DynamicLayer`, so the inherited concatenation, cropping, beam reordering and batch selection apply unchanged.
    """

    supports_early_init = False


class SlidingLatentLayer(DynamicSlidingWindowLayer):
    """A `LatentLayer` of a sliding-window layer: it keeps only the latents of the last `sliding_window - 1` tokens."""

    supports_early_init = False


class StarKVCache(Cache):
    """
    Cache of a STAR-KV model: a latent layer per compressed layer, a plain layer per layer kept full, and the
    positions (batch, tokens) of the cached tokens, stored once for all layers because keys are rebuilt and rotated
    at their own positions when they are read. Sliding-window layers keep only the window, as in transformers'
    `DynamicCache`; positions are kept for as many tokens as the longest layer holds.
    """

    def __init__(self, config, **kwargs):
        layers = []
        for i in range(config.num_hidden_layers):
            sliding = config.layer_types[i] == "sliding_attention" and config.sliding_window is not None
            if config.is_compressed(i):
                layers.append(SlidingLatentLayer(config.sliding_window) if sliding else LatentLayer())
            else:
                layers.append(DynamicSlidingWindowLayer(config.sliding_window) if sliding else DynamicLayer())
        super().__init__(layers=layers)
        self.positions: torch.Tensor | None = None

    def _held_tokens(self) -> int:
        """Tokens held by the longest layer (all of them unless every layer is a full sliding window)."""
        return max(layer.keys.shape[-2] if layer.is_initialized else 0 for layer in self.layers)

    def update_positions(self, position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Appends the positions of new tokens (once per forward) and returns those of every held token."""
        new = position_ids.to(torch.int32).expand(batch_size, -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=-1)
        return self.positions

    def trim_positions(self) -> None:
        """Drops the positions of tokens no layer holds any more (after a forward through every layer)."""
        if self.positions is not None:
            self.positions = self.positions[:, self.positions.shape[1] - self._held_tokens() :]

    def update_latents(
        self, key_latents: torch.Tensor, value_latents: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Appends (batch, new tokens, width) latents (or, quantized, uint8 rows of codes and scales) to layer
        `layer_idx`; returns those of every held token.
        """
        keys, values = self.layers[layer_idx].update(key_latents.unsqueeze(1), value_latents.unsqueeze(1))
        return keys.squeeze(1), values.squeeze(1)

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last -tokens_to_remove tokens (a positive value is the legacy "keep this many tokens")."""
        total = self.get_seq_length()
        super().crop(tokens_to_remove)
        if self.positions is not None:
            removed = -tokens_to_remove if tokens_to_remove <= 0 else max(total - tokens_to_remove, 0)
            self.positions = self.positions[:, : self.positions.shape[1] - removed]
            self.trim_positions()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]


__all__ = ["LatentLayer", "SlidingLatentLayer", "StarKVCache"]
