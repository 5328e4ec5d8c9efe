"""Calibration statistics: the second moment of each attention layer's input over the calibration tokens."""

import torch
from tqdm.auto import tqdm

from .placement import input_device


@torch.no_grad()
def attention_input_moments(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> list[torch.Tensor]:
    """
    E[x x^T] of the hidden states entering each layer's key/value projections (float64, on the model's device).

    Args:
        model: a Llama-family causal LM (layers at `model.model.layers`, projections at `self_attn.k_proj`).
        blocks: (n, seq_len) token ids, every position a real token.
    """
    layers = model.model.layers
    device = input_device(model)
    hidden = model.config.hidden_size
    sums: list[torch.Tensor | None] = [None] * len(layers)  # on each layer's device (models may be spread)
    count = 0

    def hook_for(index: int):
        def hook(module, args):
            x = args[0].reshape(-1, hidden).double()
            if sums[index] is None:
                sums[index] = torch.zeros(hidden, hidden, dtype=torch.float64, device=x.device)
            sums[index].addmm_(x.T, x)

        return hook

    handles = [layer.self_attn.k_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        batches = blocks.split(batch_size)
        for batch in tqdm(batches, desc="calibration statistics", unit="batch", disable=not progress):
            model.model(input_ids=batch.to(device), use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [s / count for s in sums]
