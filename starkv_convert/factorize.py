"""Low-rank factorization of the key/value projections: K per KV head, V jointly (METHOD.md section 1).

With whitening, a projection W (out x in) is factored as SVD(W L) = U S V^T, where L L^T is the (damped) second
moment of the projection's inputs over the calibration tokens. Then W = U (S V^T L^-1), and keeping the top r
components minimizes the mean squared error of W x over those tokens; the error of rank r is the sum of the dropped
S_i^2. Without whitening (init "svd") L is the identity: the plain SVD of the weights.
"""

from dataclasses import dataclass

import torch


@dataclass
class Factorization:
    """W ~= up[:, :r] @ down[:r]; `energy[i]` is the mean squared output of component i (S_i^2), descending."""

    up: torch.Tensor
    down: torch.Tensor
    energy: torch.Tensor

    def truncated(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out x rank), down (rank x in)) of the best rank-`rank` approximation."""
        return self.up[:, :rank], self.down[:rank]


@dataclass
class LayerFactors:
    """Factorizations of one attention layer: one per KV head for K, one joint for V."""

    k: list[Factorization]
    v: Factorization


def whitening_factor(second_moment: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + damp * mean(diag C) * I, damping more if C is too ill-conditioned."""
    c = second_moment.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    scale = c.diagonal().mean().clamp_min(1e-12)
    for relative in [damp, *(max(damp, 1e-6) * 10**attempt for attempt in range(1, 7))]:
        lower, info = torch.linalg.cholesky_ex(c + relative * scale * eye)
        if info.item() == 0:
            return lower
    raise ValueError("the calibration second-moment matrix is not positive definite even after damping")


def factorize(weight: torch.Tensor, whitening: torch.Tensor | None) -> Factorization:
    """Factorization of `weight` (out x in), whitened by the lower-triangular `whitening` (in x in) if given."""
    w = weight.double()
    if whitening is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return Factorization(up=u, down=s[:, None] * vh, energy=s**2)
    lower = whitening.double().to(w.device)
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    down = torch.linalg.solve_triangular(lower, s[:, None] * vh, upper=False, left=False)
    return Factorization(up=u, down=down, energy=s**2)


def factorize_layer(
    k_weight: torch.Tensor, v_weight: torch.Tensor, num_kv_heads: int, whitening: torch.Tensor | None
) -> LayerFactors:
    """Factors the key projection per KV head and the value projection as one matrix."""
    heads = k_weight.reshape(num_kv_heads, -1, k_weight.shape[-1])
    return LayerFactors(k=[factorize(w, whitening) for w in heads], v=factorize(v_weight, whitening))
