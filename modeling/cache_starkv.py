"""The STAR-KV cache: low-rank key/value latents per layer plus the positions of the cached tokens."""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class LatentLayer(DynamicLayer):
    """
    Cache of one compressed layer. `keys` holds the key latents (batch, tokens, sum of the per-head key ranks) and
    `values` the joint value latents (batch, tokens, value rank). The token axis is -2 as in `DynamicLayer`, so the
    inherited concatenation, cropping, beam reordering and batch selection apply unchanged.
    """

    supports_early_init = False


class StarKVCache(Cache):
    """
    Cache of a STAR-KV model: a `LatentLayer` per compressed layer, a `DynamicLayer` per layer kept full, and the
    positions of the cached tokens (batch, tokens), stored once for all layers because keys are rebuilt and rotated
    at their own positions when they are read.
    """

    def __init__(self, config, **kwargs):
        layers = [LatentLayer() if config.is_compressed(i) else DynamicLayer() for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.positions: torch.Tensor | None = None

    def update_positions(self, position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Appends the positions of new tokens (once per forward) and returns those of every cached token."""
        new = position_ids.to(torch.int32).expand(batch_size, -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=-1)
        return self.positions

    def update_latents(
        self, key_latents: torch.Tensor, value_latents: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the latents of new tokens to layer `layer_idx` and returns all of that layer's latents."""
        return self.layers[layer_idx].update(key_latents, value_latents)

    def _sync_positions(self) -> None:
        if self.positions is not None:
            self.positions = self.positions[:, : self.get_seq_length()]

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._sync_positions()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]


__all__ = ["LatentLayer", "StarKVCache"]
