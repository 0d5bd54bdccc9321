import pytest
import torch

from fxopt.linalg import project, randomized_svd


def decaying_matrix(rows: int, cols: int, rate: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, n, generator=g, dtype=torch.float64))
    return (u * torch.exp(-torch.arange(n, dtype=torch.float64) / rate)) @ v.T


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
def test_randomized_svd_is_close_to_the_best_truncation(shape: tuple[int, int]) -> None:
    a = decaying_matrix(*shape)
    exact = torch.linalg.svdvals(a)
    u, s, vh = randomized_svd(a, 24)
    assert u.shape == (shape[0], 24) and s.shape == (24,) and vh.shape == (24, shape[1])
    assert torch.allclose(s, exact[:24], rtol=1e-6)
    assert torch.all(s <= exact[:24] * (1 + 1e-12))
    for rank in (8, 24):
        best = exact[rank:].square().sum().sqrt()
        assert torch.linalg.matrix_norm(a - (u[:, :rank] * s[:rank]) @ vh[:rank]) <= 1.001 * best


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
def test_project_factors_and_kept_energy(shape: tuple[int, int]) -> None:
    a = decaying_matrix(*shape)
    left, right, energy = project(a, 32)
    assert left.shape == (shape[0], 32) and right.shape == (32, shape[1])
    assert energy == pytest.approx(float((left @ right).square().sum()), rel=1e-9)
    assert energy <= float(torch.linalg.svdvals(a)[:32].square().sum()) * (1 + 1e-12)
    assert torch.linalg.matrix_norm(a - left @ right) <= 1.05 * torch.linalg.svdvals(a)[32:].square().sum().sqrt()


def test_seeded_and_global_rng_untouched() -> None:
    a = decaying_matrix(64, 48).float()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first, second = randomized_svd(a, 8, seed=3), randomized_svd(a, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
