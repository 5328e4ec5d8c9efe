"""Choosing ranks under a KV-cache budget: uniform, or by whitened spectral energy across all heads and layers.

The budget counts cached values per token over the whole model: a compressed layer caches sum(K ranks) + V rank
values, a layer kept full caches 2 * num_kv_heads * head_dim. `--kv-ratio R` keeps at most R of the base model's
values; `k_ratio`/`v_ratio` give the key and value sides budgets of their own instead.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import StarKVError
from .factorize import LayerFactors
from .remote_code import import_remote

if TYPE_CHECKING:
    from .quant_split import SplitErrors


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def side_floats(self) -> int:
        """Values per token one side (K or V) of one full layer caches."""
        return self.num_kv_heads * self.head_dim

    @property
    def max_k_rank(self) -> int:
        return min(self.head_dim, self.hidden_size)

    @property
    def max_v_rank(self) -> int:
        return min(self.side_floats, self.hidden_size)


@dataclass
class RankPlan:
    """Per layer: the K rank of each KV head and the joint V rank, or None for a layer kept full."""

    k: list[list[int] | None]
    v: list[int | None]

    def floats_per_token(self, shape: ModelShape) -> int:
        return sum(sum(k) + v if k is not None else 2 * shape.side_floats for k, v in zip(self.k, self.v))

    def ratio(self, shape: ModelShape) -> float:
        """Fraction of the base model's cached values per token that this plan keeps."""
        return self.floats_per_token(shape) / (2 * shape.side_floats * shape.num_layers)


@dataclass(frozen=True)
class Budget:
    """Values per token available to the compressed layers: jointly (`total`) or per side (`k`, `v`)."""

    total: int | None = None
    k: int | None = None
    v: int | None = None


def parse_skip_layers(spec: str | None, num_layers: int) -> list[int]:
    """'0,1,-1' -> [0, 1, num_layers - 1]; raises StarKVError for indices out of range."""
    if not spec:
        return []
    layers = set()
    for item in spec.split(","):
        try:
            index = int(item)
        except ValueError:
            raise StarKVError(f"--skip-layers {spec!r}: expected comma-separated layer indices like 0,1,-1") from None
        if not -num_layers <= index < num_layers:
            raise StarKVError(f"--skip-layers: layer {index} is out of range for a model of {num_layers} layers")
        layers.add(index % num_layers)
    if len(layers) == num_layers:
        raise StarKVError("--skip-layers keeps every layer full: nothing would be compressed")
    return sorted(layers)


def _check_ratio(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise StarKVError(f"{name} must be in (0, 1], got {value}")


def make_budget(
    shape: ModelShape,
    skip: list[int],
    kv_ratio: float,
    k_ratio: float | None = None,
    v_ratio: float | None = None,
) -> Budget:
    """The values per token left to the compressed layers once the layers kept full are paid for."""
    n_layers, side = shape.num_layers, shape.side_floats
    n_compressed = n_layers - len(skip)
    if (k_ratio is None) != (v_ratio is None):
        raise StarKVError("give both --k-ratio and --v-ratio, or neither")
    if k_ratio is None:
        _check_ratio("--kv-ratio", kv_ratio)
        total = int(kv_ratio * 2 * side * n_layers + 1e-6) - 2 * side * len(skip)
        needed = n_compressed * (shape.num_kv_heads + 1)
        if total < needed:
            raise StarKVError(
                f"--kv-ratio {kv_ratio} leaves {max(total, 0)} cached values per token for {n_compressed} compressed "
                f"layers, fewer than the {needed} needed (rank 1 per head): raise --kv-ratio or skip fewer layers"
            )
        return Budget(total=total)
    _check_ratio("--k-ratio", k_ratio)
    _check_ratio("--v-ratio", v_ratio)
    k = int(k_ratio * side * n_layers + 1e-6) - side * len(skip)
    v = int(v_ratio * side * n_layers + 1e-6) - side * len(skip)
    if k < n_compressed * shape.num_kv_heads or v < n_compressed:
        raise StarKVError(
            f"--k-ratio {k_ratio} / --v-ratio {v_ratio} leave too few values for {n_compressed} compressed layers "
            "(rank 1 per head and per value block): raise them or skip fewer layers"
        )
    return Budget(k=k, v=v)


def uniform_ranks(shape: ModelShape, skip: list[int], budget: Budget) -> RankPlan:
    """The same K rank for every head and the same V rank for every compressed layer, within the budget."""
    n_compressed = shape.num_layers - len(skip)
    if budget.total is not None:
        k_values = v_values = budget.total / (2 * n_compressed)
    else:
        k_values, v_values = budget.k / n_compressed, budget.v / n_compressed
    k_rank = max(1, min(shape.max_k_rank, int(k_values / shape.num_kv_heads + 1e-6)))
    v_rank = max(1, min(shape.max_v_rank, int(v_values + 1e-6)))
    if budget.total is not None:  # rank 1 per key head may cost more than half a layer's share: values give way
        v_rank = min(v_rank, budget.total // n_compressed - k_rank * shape.num_kv_heads)
        if v_rank < 1:
            raise StarKVError("the budget is too small for uniform ranks (rank 1 per head): raise --kv-ratio")
    plan = RankPlan(k=[], v=[])
    for layer in range(shape.num_layers):
        full = layer in skip
        plan.k.append(None if full else [k_rank] * shape.num_kv_heads)
        plan.v.append(None if full else v_rank)
    return plan


def energy_ranks(factors: dict[int, LayerFactors], shape: ModelShape, skip: list[int], budget: Budget) -> RankPlan:
    """
    Keeps the components with the most whitened spectral energy across all heads and layers. A component's score
    is its share of its block's energy (a block: one KV head's keys, or one layer's values), so the greedy choice
    minimizes the sum of the blocks' relative reconstruction errors, and heads, layers and the key and value sides of
    different scales compete on the same footing. Every block keeps at least rank 1.
    """
    blocks, scores, block_ids, sides = [], [], [], []
    for layer in range(shape.num_layers):
        if layer in skip:
            continue
        f = factors[layer]
        for side, energies in [("k", h.energy) for h in f.k] + [("v", f.v.energy)]:
            block_ids.append(torch.full((len(energies) - 1,), len(blocks)))
            scores.append((energies[1:] / energies.sum().clamp_min(1e-30)).float().cpu())
            sides.append(torch.full((len(energies) - 1,), side == "k"))
            blocks.append((layer, side))
    scores, block_ids, is_k = torch.cat(scores), torch.cat(block_ids), torch.cat(sides)
    counts = torch.ones(len(blocks), dtype=torch.long)
    n_k_blocks = sum(side == "k" for _, side in blocks)
    if budget.total is not None:
        counts += _top_counts(scores, block_ids, len(blocks), budget.total - len(blocks))
    else:
        counts += _top_counts(scores[is_k], block_ids[is_k], len(blocks), budget.k - n_k_blocks)
        counts += _top_counts(scores[~is_k], block_ids[~is_k], len(blocks), budget.v - (len(blocks) - n_k_blocks))

    plan = RankPlan(k=[None] * shape.num_layers, v=[None] * shape.num_layers)
    for (layer, side), count in zip(blocks, counts.tolist()):
        if side == "k":
            plan.k[layer] = (plan.k[layer] or []) + [count]
        else:
            plan.v[layer] = count
    return plan


def quantization_plan(
    plan: RankPlan,
    bits: str,
    share: float,
    group: int = 32,
    errors: "SplitErrors | None" = None,
    auto_budget: str = "model",
    align: int | None = None,
) -> dict | None:
    """
    The config's `kv_quant` for `--kv-bits`: "16" none, "8" every channel in 8 bits, "4" every channel in 4 bits,
    "mixed" the leading `share` of each block's channels (largest singular values) in 8 bits and the rest in 4,
    "auto" a split per block chosen from `errors` (`quant_split.SplitErrors`) at mixed's bytes per token, pooled
    over the model or per side (`auto_budget`, see `quant_split.auto_quantization_plan`). `align`: the cache rows'
    alignment in bytes (default `latent_quant.ROW_ALIGN`); mixed and auto keep 8-bit parts of whole multiples of it
    (or whole blocks), so each block's 4-bit codes start aligned too and the decode kernel reads them in words.
    """
    align = align or import_remote("latent_quant").ROW_ALIGN
    if bits == "16":
        return None
    if bits == "auto":
        from .quant_split import auto_quantization_plan  # it builds on this function

        if errors is None:
            raise ValueError("--kv-bits auto chooses its split from measured errors: pass errors")
        return auto_quantization_plan(plan, errors, share, group, auto_budget, align)
    fraction = {"8": 1.0, "4": 0.0, "mixed": share}[bits]

    def n8(rank: int) -> int:
        aligned = round(fraction * rank / align) * align
        return rank if fraction == 1.0 or aligned >= rank else aligned

    return {
        "group": group,
        "k_n8": [None if k is None else [n8(r) for r in k] for k in plan.k],
        "v_n8": [None if v is None else n8(v) for v in plan.v],
        "align": align,
    }


def _top_counts(scores: torch.Tensor, block_ids: torch.Tensor, n_blocks: int, n_take: int) -> torch.Tensor:
    """How many of each block's components are among the `n_take` highest scores."""
    n_take = max(0, min(n_take, len(scores)))
    order = torch.argsort(scores, descending=True, stable=True)[:n_take]
    return torch.bincount(block_ids[order], minlength=n_blocks)
