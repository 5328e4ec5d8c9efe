"""The STAR-KV cache: low-rank key/value latents per layer plus the positions (and RoPE tables) of the cached tokens."""

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from .latent_decode import rope_tables

RopeArgs = tuple[torch.Tensor, float, torch.dtype]  # inv_freq, attention scaling, dtype of the decode kernel's tables


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
    `DynamicCache`; positions are kept for as many tokens as the longest layer holds. For the decode kernel of a
    16-bit model it also keeps the RoPE tables of those positions, so no step computes them for every cached token.
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
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of `positions`, once kept
        self.rope_args: RopeArgs | None = None

    def _held_tokens(self) -> int:
        """Tokens held by the longest layer (all of them unless every layer is a full sliding window)."""
        return max(layer.keys.shape[-2] if layer.is_initialized else 0 for layer in self.layers)

    def update_positions(
        self, position_ids: torch.Tensor, batch_size: int, rope_args: RopeArgs | None = None
    ) -> torch.Tensor:
        """
        Appends the positions of new tokens (once per forward) and returns those of every held token. From the first
        call with `rope_args` on, the cache also keeps the decode kernel's RoPE tables of every held token
        (`rope_tables`: cos, sin, (batch, tokens, head_dim / 2)), each token's made once, as it is appended.
        """
        new = position_ids.to(torch.int32).expand(batch_size, -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=-1)
        if self._keeps_rope_tables(rope_args):
            if self.rope_tables is None or self.rope_tables[0].shape[1] + new.shape[1] != self.positions.shape[1]:
                self.rope_tables = self._make_rope_tables(self.positions)
            else:
                new_tables = self._make_rope_tables(new)
                self.rope_tables = tuple(torch.cat([t, n], dim=1) for t, n in zip(self.rope_tables, new_tables))
        return self.positions

    def _keeps_rope_tables(self, rope_args: RopeArgs | None) -> bool:
        if self.rope_args is None:
            self.rope_args = rope_args
        return self.rope_args is not None

    def _make_rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling, dtype = self.rope_args
        return rope_tables(positions, inv_freq, scaling, dtype)

    def _per_token(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies `fn` to the positions and RoPE tables (batch and tokens their first two axes)."""
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.rope_tables is not None:
            self.rope_tables = tuple(fn(t) for t in self.rope_tables)

    def trim_positions(self) -> None:
        """Drops the positions of tokens no layer holds any more (after a forward through every layer)."""
        if self.positions is not None:
            held = self._held_tokens()
            self._per_token(lambda t: t[:, t.shape[1] - held :])

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
        self.positions = self.rope_tables = None  # (tables are kept again from the next tokens on)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._per_token(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last -tokens_to_remove tokens (a positive value is the legacy "keep this many tokens")."""
        total = self.get_seq_length()
        super().crop(tokens_to_remove)
        if self.positions is not None:
            removed = -tokens_to_remove if tokens_to_remove <= 0 else max(total - tokens_to_remove, 0)
            self._per_token(lambda t: t[:, : t.shape[1] - removed])
            self.trim_positions()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._per_token(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._per_token(lambda t: t[indices, ...])


class StaticLatentLayer(StaticLayer):
    """A `LatentLayer` preallocated for `max_cache_len` tokens and written in place (torch.compile, CUDA graphs)."""

    supports_early_init = False


class StarKVStaticCache(StarKVCache):
    """
    The static version of `StarKVCache` (`cache_implementation="static"`): every layer and the positions are
    preallocated for `max_cache_len` tokens and written in place, so a decode step has fixed shapes and addresses.
    Attention reads all `max_cache_len` slots and the mask hides those not written yet. Sliding-window layers keep
    every token too (the mask applies the window).
    """

    def __init__(self, config, max_cache_len: int, **kwargs):
        layers = [
            StaticLatentLayer(max_cache_len) if config.is_compressed(i) else StaticLayer(max_cache_len)
            for i in range(config.num_hidden_layers)
        ]
        Cache.__init__(self, layers=layers)
        self._max_cache_len = max_cache_len
        self.positions: torch.Tensor | None = None
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rope_args: RopeArgs | None = None
        self.written: torch.Tensor | None = None  # tokens written so far, a 0-d tensor (no recompilation as it grows)

    @property
    def max_cache_len(self) -> int:  # a read-only property of `Cache` in some transformers versions
        return self._max_cache_len

    def update_positions(
        self, position_ids: torch.Tensor, batch_size: int, rope_args: RopeArgs | None = None
    ) -> torch.Tensor:
        """
        Writes the positions of new tokens into their slots and returns all `max_cache_len` slots; keeps the RoPE
        tables as `StarKVCache.update_positions` does, written in place (made from every slot the first time).
        """
        new = position_ids.to(torch.int32).expand(batch_size, -1)
        if self.positions is None:
            self.positions = torch.zeros(batch_size, self._max_cache_len, dtype=torch.int32, device=new.device)
            self.written = torch.zeros((), dtype=torch.int64, device=new.device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.positions)
                torch._dynamo.mark_static_address(self.written)
        slots = torch.arange(new.shape[1], device=new.device) + self.written
        self.positions.index_copy_(1, slots, new)
        self.written.add_(new.shape[1])
        if self._keeps_rope_tables(rope_args):
            if self.rope_tables is None:  # every slot: those not written yet are masked until they are
                self.rope_tables = self._make_rope_tables(self.positions)
                if not torch.compiler.is_compiling():
                    for table in self.rope_tables:
                        torch._dynamo.mark_static_address(table)
            else:
                for table, values in zip(self.rope_tables, self._make_rope_tables(new)):
                    table.index_copy_(1, slots, values)
        return self.positions

    def trim_positions(self) -> None:
        """Nothing to trim: the slots stay."""

    def reset(self) -> None:
        """Empties the cache; the RoPE tables stay allocated (every slot's are written again with its position)."""
        Cache.reset(self)
        if self.positions is not None:
            self.positions.zero_()
            self.written.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a static STAR-KV cache cannot be cropped: use the dynamic cache")


__all__ = ["LatentLayer", "SlidingLatentLayer", "StarKVCache", "StarKVStaticCache", "StaticLatentLayer"]
