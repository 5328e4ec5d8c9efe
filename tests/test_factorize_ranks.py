"""Whitened factorization and rank allocation, on random matrices of awkward sizes."""

import pytest
import torch

from starkv_convert.factorize import factorize, factorize_layer, whitening_factor
from starkv_convert.ranks import ModelShape, energy_ranks, make_budget, uniform_ranks

torch.manual_seed(0)


def _inputs(n: int, dim: int) -> torch.Tensor:
    mixing = torch.randn(dim, dim, dtype=torch.float64) * torch.logspace(0, -2, dim, dtype=torch.float64)
    return torch.randn(n, dim, dtype=torch.float64) @ mixing


def test_full_rank_reconstructs_exactly():
    w = torch.randn(20, 37, dtype=torch.float64)
    x = _inputs(500, 37)
    for whitening in (None, whitening_factor(x.T @ x / len(x), 1e-3)):
        f = factorize(w, whitening)
        up, down = f.truncated(20)
        assert torch.allclose(up @ down, w, atol=1e-9)
        assert torch.all(f.energy[:-1] >= f.energy[1:])


def test_whitening_minimizes_output_error_on_the_calibration_inputs():
    w = torch.randn(24, 40, dtype=torch.float64)
    x = _inputs(2000, 40)
    second_moment = x.T @ x / len(x)
    whitened = factorize(w, whitening_factor(second_moment, 0.0))
    plain = factorize(w, None)

    def output_error(f, r):
        up, down = f.truncated(r)
        return ((x @ (w - up @ down).T) ** 2).sum(-1).mean().item()

    for r in (3, 8, 15):
        assert output_error(whitened, r) < output_error(plain, r)
        # the error of rank r is the energy of the dropped components
        assert output_error(whitened, r) == pytest.approx(whitened.energy[r:].sum().item(), rel=1e-6)


def test_ill_conditioned_moments_get_more_damping():
    x = _inputs(10, 30)  # rank 10 < 30: singular second moment
    lower = whitening_factor(x.T @ x / len(x), 0.0)
    assert torch.isfinite(lower).all() and (lower.diagonal() > 0).all()


SHAPE = ModelShape(num_layers=5, num_kv_heads=3, head_dim=16, hidden_size=96)


def _factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(SHAPE.num_layers):
        scale = torch.logspace(0, -3 + layer * 0.5, 96, dtype=torch.float64)
        k = torch.randn(48, 96, generator=g, dtype=torch.float64) * scale
        v = torch.randn(48, 96, generator=g, dtype=torch.float64)
        factors[layer] = factorize_layer(k, v, SHAPE.num_kv_heads, None)
    return factors


@pytest.mark.parametrize("ratio", [0.13, 0.3, 0.5, 0.77, 1.0])
def test_energy_ranks_meet_the_budget_exactly(ratio):
    budget = make_budget(SHAPE, [], ratio)
    plan = energy_ranks(_factors(), SHAPE, [], budget)
    assert plan.floats_per_token(SHAPE) == budget.total
    assert plan.ratio(SHAPE) <= ratio
    assert all(1 <= r <= SHAPE.head_dim for ks in plan.k for r in ks)
    assert all(1 <= v <= SHAPE.side_floats for v in plan.v)


def test_energy_ranks_are_ragged_and_follow_the_spectra():
    plan = energy_ranks(_factors(), SHAPE, [], make_budget(SHAPE, [], 0.4))
    k_per_layer = [sum(k) for k in plan.k]
    assert len(set(k_per_layer)) > 1
    assert k_per_layer[0] < k_per_layer[-1]  # layer 0's keys decay fastest: they need the fewest components


def test_side_budgets_and_skipped_layers():
    budget = make_budget(SHAPE, [0, 4], 0.5, k_ratio=0.6, v_ratio=0.7)
    plan = energy_ranks(_factors(), SHAPE, [0, 4], budget)
    assert plan.k[0] is None and plan.v[4] is None
    assert sum(sum(k) for k in plan.k if k) == budget.k and sum(v for v in plan.v if v) == budget.v
    uniform = uniform_ranks(SHAPE, [0, 4], budget)
    assert uniform.k[1] == uniform.k[2] == uniform.k[3] and uniform.floats_per_token(SHAPE) <= (
        budget.k + budget.v + 2 * 2 * SHAPE.side_floats
    )


def test_full_budget_keeps_full_rank():
    plan = energy_ranks(_factors(), SHAPE, [], make_budget(SHAPE, [], 1.0))
    assert all(k == [SHAPE.head_dim] * SHAPE.num_kv_heads for k in plan.k)
    assert all(v == SHAPE.side_floats for v in plan.v)


def test_uniform_ranks_never_exceed_a_small_budget():
    shape = ModelShape(num_layers=4, num_kv_heads=8, head_dim=16, hidden_size=96)
    for ratio in (0.04, 0.05, 0.07, 0.1):
        budget = make_budget(shape, [], ratio)
        plan = uniform_ranks(shape, [], budget)
        assert plan.floats_per_token(shape) <= budget.total
        assert plan.ratio(shape) <= ratio
