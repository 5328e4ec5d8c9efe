"""
`--kv-bits auto`: how many leading latent channels of each block keep 8 bits, chosen from calibration statistics.

A block (one KV head's key latents, or one layer's value latents) stores its leading `n8` channels in int8 and the
rest in int4, with an fp16 scale per token and group of channels (modeling/latent_quant.py, whose functions are used
here as they are). `measure_split_errors` runs a few calibration blocks through the unquantized STAR-KV model and,
for every block and every n8 in 0..rank, accumulates the error that this split leaves in the rebuilt keys/values:
sum over tokens of ||(z_hat - z) B^T||^2, with z the block's latents, z_hat them quantized and dequantized (with the
split's 4-bit channels rotated before and turned back after, as the converter exports them: `rotation`), and B the
block's up-projection; it is divided by the energy of the layer's rebuilt keys (or values), the sum over the layer's
blocks of ||z B^T||^2. Biases and Qwen3's k-norm are left out (a key bias moves all of a query's scores alike).
`choose_split` then picks the split of least summed error within a byte budget: the bytes per token of
`--kv-bits mixed` at the same `--kv-8bit-share` (`auto_quantization_plan`), so auto replaces mixed at equal memory.
"""

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import StarKVError
from .placement import input_device
from .ranks import RankPlan, quantization_plan
from .remote_code import import_remote
from .rotation import rotate_rows, unrotate_rows

DEFAULT_BLOCKS = 4  # calibration blocks measured by --kv-bits auto
AUTO_BUDGETS = ("side", "model")  # --kv-auto-budget: mixed's bytes kept per side (K, V), or shared by all blocks


def _quant() -> Any:
    return import_remote("latent_quant")


@dataclass
class SplitErrors:
    """Per block, in config order (each compressed layer's key heads, then its values): the relative key/value-space
    error of each split, `errors[b][n8]` for n8 = 0..rank, summed over `tokens` measured tokens."""

    layers: list[int]
    sides: list[str]  # "k" or "v"
    errors: list[torch.Tensor]  # (rank + 1,) float64 each
    tokens: int
    sequences: int  # calibration blocks measured

    @property
    def ranks(self) -> list[int]:
        return [len(e) - 1 for e in self.errors]

    def total(self, n8: list[int]) -> float:
        """The summed relative error of the split that keeps `n8[b]` channels of block b in 8 bits."""
        return float(sum(e[n] for e, n in zip(self.errors, n8)))


def pick_blocks(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """`count` of the (n, seq_len) calibration blocks, evenly spaced over them (all of them if there are fewer)."""
    if count >= len(blocks):
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, count).round().long()]


def split_errors_of(
    z: torch.Tensor, up: torch.Tensor, group: int, rotate: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    (squared error of the rebuilt rows for n8 = 0..rank, squared norm of the rebuilt rows), float64, of latents
    z (..., rank) quantized with each split and rebuilt by `up` (out, rank), summed over tokens. `rotate`: each
    split's 4-bit channels are quantized rotated, as the converter exports them (`rotation`).
    """
    quant = _quant()
    z = z.reshape(-1, z.shape[-1])
    exact = z.float()
    gram = up.float().T @ up.float()  # ||e B^T||^2 = e (B^T B) e^T: cheaper than rebuilding when rank <= out

    def energy(x: torch.Tensor) -> torch.Tensor:
        return torch.sum((x @ gram) * x, dtype=torch.float64)

    errors = []
    for n8 in range(z.shape[-1] + 1):
        stored = rotate_rows(exact, n8) if rotate else exact
        error = quant.dequantize_latents(quant.quantize_latents(stored, n8, group)) - stored
        errors.append(energy(unrotate_rows(error, n8) if rotate else error))
    return torch.stack(errors), energy(exact)


@torch.no_grad()
def measure_split_errors(
    model: Any,
    blocks: torch.Tensor,
    group: int = 32,
    batch_size: int = 4,
    progress: bool = True,
    rotate: bool = False,
) -> SplitErrors:
    """
    Runs `blocks` (n, seq_len) through a STAR-KV `model` and measures, with hooks on its latent projections, the
    relative error of every split of every block (statistics accumulate batch by batch; no activation is kept).
    The model's own quantization, if it has one, is not involved: the hooks see the latents before it. `rotate`:
    as the converter will export the split, with its 4-bit channels rotated.
    """
    config = model.config
    layers = [i for i in range(config.num_hidden_layers) if config.is_compressed(i)]
    heads = {i: [(i, "k", j) for j in range(len(config.kv_k_ranks[i]))] for i in layers}
    order = [block for i in layers for block in [*heads[i], (i, "v", 0)]]  # (layer, side, head), config order
    index = {block: b for b, block in enumerate(order)}
    errors: list[torch.Tensor | float] = [0.0] * len(order)
    energy: dict[tuple[int, str], torch.Tensor | float] = {}

    def add(layer: int, side: str, head: int, z: torch.Tensor, up: torch.Tensor) -> None:
        err, e = split_errors_of(z, up, group, rotate)
        b = index[(layer, side, head)]
        errors[b] = errors[b] + err.cpu()
        energy[(layer, side)] = energy.get((layer, side), 0.0) + e.cpu()

    def key_hook(layer: int, attn: torch.nn.Module):
        def hook(module, args, output):
            ranks = attn.k_b_proj.ranks
            ups = attn.k_b_proj.weight.split(ranks, dim=-1)
            for head, (z, up) in enumerate(zip(output.split(ranks, dim=-1), ups)):
                add(layer, "k", head, z, up)

        return hook

    def value_hook(layer: int, attn: torch.nn.Module):
        def hook(module, args, output):
            add(layer, "v", 0, output, attn.v_b_proj.weight)

        return hook

    handles = []
    for i in layers:
        attn = model.model.layers[i].self_attn
        handles.append(attn.k_a_proj.register_forward_hook(key_hook(i, attn)))
        handles.append(attn.v_a_proj.register_forward_hook(value_hook(i, attn)))
    device, batches = input_device(model), blocks.split(batch_size)
    try:
        for batch in tqdm(batches, desc="measuring 8/4-bit splits", unit="batch", disable=not progress):
            model.model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    relative = [err / max(float(energy[(i, side)]), 1e-30) for (i, side, _), err in zip(order, errors)]
    layer_of, side_of = [i for i, _, _ in order], [side for _, side, _ in order]
    return SplitErrors(layer_of, side_of, relative, blocks.numel(), len(blocks))


def choose_split(errors: list[torch.Tensor], budget: int, group: int = 32, step: int = 1) -> list[int]:
    """
    How many leading channels of each block keep 8 bits, given each block's error for n8 = 0..rank: the split of
    least summed error whose bytes per token (all blocks together) fit `budget`, among n8 that are multiples of
    `step` or the whole rank, each block's codes padded to a multiple of `step` bytes as a `LatentCodec` row of that
    alignment holds them.

    Rule: every block costs at least its all-4-bit bytes (n8 = 0 is its cheapest split); the bytes above that are
    spent exactly, by dynamic programming over bytes (a multiple-choice knapsack: for each block in turn, the least
    error of the blocks so far at each number of extra bytes, over that block's rank + 1 splits), so each byte goes
    where it removes the most error in total. Bytes are `quantized_bytes_per_token` (codes plus one fp16 scale per
    group), so group boundaries are priced exactly. A greedy by error removed per extra byte is not enough here:
    a block's first 8-bit channel also pays a new scale, so its error/bytes curve is lumpy and greedy steps can
    miss a block whose 8-bit channels pay off only as a whole group. Ties go to fewer 8-bit channels.
    """
    size = _quant().quantized_bytes_per_token
    costs = [torch.tensor([size(len(e) - 1, n, group, step) for n in range(len(e))]) for e in errors]
    extras = [cost - cost[0] for cost in costs]
    left = budget - sum(int(cost[0]) for cost in costs)
    if left < 0:
        raise StarKVError(f"a budget of {budget} bytes per token cannot hold every block's latents in 4 bits")
    spent = torch.arange(left + 1)
    best = torch.zeros(left + 1, dtype=torch.float64)  # least error of the blocks so far within c extra bytes
    choices = []
    for error, extra in zip(errors, extras):
        n8 = torch.arange(len(error))
        error = error.double().cpu().masked_fill((n8 % step != 0) & (n8 != len(error) - 1), torch.inf)
        before = spent[None, :] - extra[:, None]  # (splits, bytes): the bytes left to the blocks before this one
        total = best[before.clamp_min(0)] + error[:, None]
        best, choice = total.masked_fill(before < 0, torch.inf).min(dim=0)
        choices.append(choice)
    n8, at = [], left
    for extra, choice in zip(reversed(extras), reversed(choices)):
        n8.append(int(choice[at]))
        at -= int(extra[n8[-1]])
    return n8[::-1]


def latent_bytes(plan: RankPlan, kv_quant: dict) -> int:
    """Bytes per token of the quantized latents of every compressed layer: what the cache rows hold, alignment too."""
    codec, group, align = _quant().LatentCodec, kv_quant["group"], row_align(kv_quant)
    total = 0
    for k, v, k_n8, v_n8 in zip(plan.k, plan.v, kv_quant["k_n8"], kv_quant["v_n8"]):
        if k is not None:
            total += codec(k, k_n8, group, align).bytes_per_token + codec([v], [v_n8], group, align).bytes_per_token
    return total


def row_align(kv_quant: dict) -> int:
    """The cache rows' alignment of a `kv_quant` (bytes), as the checkpoint's model reads it."""
    return _quant().row_align(kv_quant)


def flat_n8(plan: RankPlan, kv_quant: dict) -> list[int]:
    """The n8 of every block, in `SplitErrors` order."""
    blocks = zip(plan.k, kv_quant["k_n8"], kv_quant["v_n8"])
    return [n for k, k_n8, v_n8 in blocks if k is not None for n in k_n8 + [v_n8]]


def nested_n8(plan: RankPlan, n8: list[int], group: int, align: int) -> dict:
    """The config's `kv_quant` from the n8 of every block in `SplitErrors` order (the inverse of `flat_n8`)."""
    chosen, k_n8, v_n8 = iter(n8), [], []
    for k in plan.k:
        k_n8.append(None if k is None else [next(chosen) for _ in k])
        v_n8.append(None if k is None else next(chosen))
    return {"group": group, "k_n8": k_n8, "v_n8": v_n8, "align": align}


def auto_quantization_plan(
    plan: RankPlan, errors: SplitErrors, share: float, group: int = 32, budget: str = "model", align: int = 4
) -> dict:
    """
    The config's `kv_quant` of `--kv-bits auto`: the splits of `choose_split` at the bytes per token that
    `--kv-bits mixed` with the same `share` takes, so auto replaces mixed at equal memory (each row may round up by
    a few bytes more: its length is a multiple of the codec's alignment, so by at most align - 2 bytes, 2 at 4).
    `budget` "model": all blocks draw on mixed's bytes together (keys and values trade bytes by their relative
    errors); "side": the keys get mixed's key bytes and the values mixed's value bytes, each chosen among their own
    blocks. `align`: the rows' alignment (8-bit parts in whole multiples of it, see `choose_split`).
    """
    ranks = [r for k, v in zip(plan.k, plan.v) if k is not None for r in k + [v]]
    if ranks != errors.ranks:
        raise StarKVError(f"measured split errors for ranks {errors.ranks} do not fit the plan's {ranks}")
    if budget not in AUTO_BUDGETS:
        raise StarKVError(f"--kv-auto-budget {budget!r}: use {' or '.join(AUTO_BUDGETS)}")
    mixed_plan = quantization_plan(plan, "mixed", share, group, align=align)
    size, mixed = _quant().quantized_bytes_per_token, flat_n8(plan, mixed_plan)
    pools = [list(range(len(ranks)))]
    if budget == "side":
        pools = [[b for b, s in enumerate(errors.sides) if s == side] for side in "kv"]
    n8 = [0] * len(ranks)
    for blocks in pools:
        bytes_ = sum(size(ranks[b], mixed[b], group, align) for b in blocks)
        for b, n in zip(blocks, choose_split([errors.errors[b] for b in blocks], bytes_, group, align)):
            n8[b] = n
    return nested_n8(plan, n8, group, align)


def split_summary(
    plan: RankPlan,
    kv_quant: dict,
    bits: str,
    share: float,
    errors: SplitErrors | None = None,
    budget: str = "model",
) -> dict:
    """What the report and card say of a quantized plan: shares of channels in 8 bits, bytes per token (and, for
    auto, the budget and the measured relative errors of auto's split and of mixed's)."""
    sides = {"k": ([], []), "v": ([], [])}  # (ranks, n8) per side
    for k, v, kn, vn in zip(plan.k, plan.v, kv_quant["k_n8"], kv_quant["v_n8"]):
        if k is not None:
            sides["k"][0].extend(k)
            sides["k"][1].extend(kn)
            sides["v"][0].append(v)
            sides["v"][1].append(vn)
    ranks, n8 = sides["k"][0] + sides["v"][0], sides["k"][1] + sides["v"][1]
    block_shares = [n / r for n, r in zip(n8, ranks)]
    summary = {
        "method": bits,
        "group": kv_quant["group"],
        "row_align": row_align(kv_quant),
        "latent_bytes_per_token": latent_bytes(plan, kv_quant),
        "share_8bit": sum(n8) / sum(ranks),
        "k_share_8bit": sum(sides["k"][1]) / sum(sides["k"][0]),
        "v_share_8bit": sum(sides["v"][1]) / sum(sides["v"][0]),
        "block_share_8bit": {"min": min(block_shares), "max": max(block_shares)},
        "block_n8": {"min": min(n8), "max": max(n8)},
        "k_n8": kv_quant["k_n8"],
        "v_n8": kv_quant["v_n8"],
    }
    if bits == "auto":
        mixed = quantization_plan(plan, "mixed", share, kv_quant["group"], align=row_align(kv_quant))
        summary["budget"] = {
            "kv_8bit_share": share,
            "mixed_latent_bytes_per_token": latent_bytes(plan, mixed),
            "pooled_over": budget,
        }
        if errors is not None:
            summary["calibration"] = {"blocks": errors.sequences, "tokens": errors.tokens}
            summary["relative_error"] = {
                "auto": side_errors(errors, flat_n8(plan, kv_quant)),
                "mixed": side_errors(errors, flat_n8(plan, mixed)),
                "all_4bit": side_errors(errors, [0] * len(errors.errors)),
                "all_8bit": side_errors(errors, errors.ranks),
                "data": "summed over blocks (keys: over every layer's heads; values: over layers), on the calibration "
                "tokens measured",
            }
    return summary


def side_errors(errors: SplitErrors, n8: list[int]) -> dict[str, float]:
    """The summed relative errors of a split: of the keys, of the values and in total."""
    blocks = list(zip(errors.errors, n8, errors.sides))
    k, v = (sum(float(e[n]) for e, n, s in blocks if s == side) for side in "kv")
    return {"k": k, "v": v, "total": k + v}
