"""Truncated decompositions of weight matrices, for the lossy passes that keep a few directions.

A full SVD of a 4096 x 4096 weight takes a minute or more on a CPU, but a low-rank rewrite
keeps only the top few hundred singular triplets. A randomized range finder (Halko,
Martinsson & Tropp, SIAM Review 2011, algorithms 4.4 and 5.1) gets those from a few
matrix products with a random block, at a cost proportional to the rank.

Every function draws its random block from its own ``torch.Generator`` seeded with
``seed``: results are deterministic and the caller's global RNG state is left untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Projection(NamedTuple):
    """``a ~ left @ right`` of rank ``left.shape[1]``; ``energy`` is ``||left @ right||_F^2``."""

    left: torch.Tensor
    right: torch.Tensor
    energy: float


def range_basis(a: torch.Tensor, columns: int, power_iterations: int = 2, seed: int = 0) -> torch.Tensor:
    """Orthonormal columns ``Q`` (``a.shape[0] x columns``) spanning about the top left singular
    subspace of ``a``: ``Q @ Q.mT @ a`` is close to the best rank-``columns`` approximation.

    Each power iteration multiplies by ``a @ a.mT`` once (re-orthonormalizing in between), which
    sharpens the subspace when the spectrum decays slowly.
    """
    generator = torch.Generator(device=a.device).manual_seed(seed)
    sketch = torch.randn(a.shape[1], columns, generator=generator, dtype=a.dtype, device=a.device)
    basis = torch.linalg.qr(a @ sketch).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    return basis


def project(a: torch.Tensor, rank: int, power_iterations: int = 2, seed: int = 0) -> Projection:
    """A rank-``rank`` approximation of ``a`` by projection onto a :func:`range_basis`.

    Cheaper than :func:`randomized_svd` at the same rank (no SVD of the projected block): use
    it to test whether the largest rank of interest is good enough at all.
    """
    if a.shape[0] > a.shape[1]:  # orthonormalize the shorter side: QR of a smaller block
        flipped = project(a.mT, rank, power_iterations, seed)
        return Projection(flipped.right.mT, flipped.left.mT, flipped.energy)
    basis = range_basis(a, rank, power_iterations, seed)
    coefficients = basis.mT @ a
    return Projection(basis, coefficients, float(coefficients.double().square().sum()))


def randomized_svd(a: torch.Tensor, rank: int, oversample: int = 16, power_iterations: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets ``(U, S, Vh)`` of ``a``, approximately.

    The range is sketched with ``rank + oversample`` columns, so the last kept triplets are
    nearly as accurate as the first. ``S`` never exceeds the true singular values, and
    ``U[:, :r] * S[:r] @ Vh[:r]`` is a rank-``r`` approximation for every ``r <= rank``.
    """
    if a.shape[0] > a.shape[1]:
        u, s, vh = randomized_svd(a.mT, rank, oversample, power_iterations, seed)
        return vh.mT, s, u.mT
    columns = min(rank + oversample, min(a.shape))
    basis = range_basis(a, columns, power_iterations, seed)
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]
