"""The model card's picture of the ranks: key rank per layer and KV head, value rank per layer."""

from pathlib import Path

from .ranks import ModelShape, RankPlan

RANKS_PLOT = "ranks.png"


def plot_ranks(plan: RankPlan, shape: ModelShape, path: Path, title: str) -> None:
    """Writes a PNG: a heat map of the key ranks (layers x KV heads) beside the value rank of each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = range(shape.num_layers)
    k = np.array([plan.k[i] if plan.k[i] is not None else [shape.head_dim] * shape.num_kv_heads for i in layers])
    v = np.array([plan.v[i] if plan.v[i] is not None else shape.side_floats for i in layers])
    full = [i for i in layers if plan.k[i] is None]

    fig, (ax_k, ax_v) = plt.subplots(1, 2, figsize=(10, 0.18 * shape.num_layers + 2), width_ratios=[2, 1])
    image = ax_k.imshow(k, aspect="auto", cmap="viridis", vmin=0, vmax=shape.head_dim, interpolation="nearest")
    ax_k.set(xlabel="KV head", ylabel="layer", title=f"key rank (of {shape.head_dim})")
    fig.colorbar(image, ax=ax_k)
    colors = ["tab:gray" if i in full else "tab:orange" for i in layers]
    ax_v.barh(list(layers), v, color=colors)
    ax_v.set(xlabel="rank", title=f"value rank (of {shape.side_floats}); gray: kept full", xlim=(0, shape.side_floats))
    ax_v.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
