"""low-rank's search description: the ranks a layer may take and how one is chosen.

Not a pass (a leading underscore): the helpers of :mod:`fxopt.passes.low_rank`. A layer's
levels are ranks below break-even; :func:`choose_rank` finds the smallest whose measured
model error fits the layer's share of the budget (or the rank ``ratio``/``energy`` asks
for), on an exact float64 SVD for small weights and a randomized one, grown as needed, for
large ones (:class:`Svds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

import torch

from fxopt.cost import low_rank_break_even
from fxopt.ir import LinearParts
from fxopt.linalg import project, randomized_svd
from fxopt.lossy import Pick, first_passing
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import NO_SAVING, OVER_BUDGET

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Choice = tuple[int, float | None, Refusal | None, Hashable]
EXACT_SVD_MAX_SIDE = 512  # a full float64 SVD of a 512 x 512 weight takes a fraction of a second


class Options(Protocol):
    """The options of the pass that the rank search reads."""

    energy: float | None
    ratio: float | None
    multiple: int
    svd: str
    sketch_rank: int


def svds_of(options: Options, weight: torch.Tensor) -> Svds:
    """The SVDs the search takes for ``weight``: exact when ``svd="exact"``, or ``"auto"`` and
    the weight's smaller side is at most ``EXACT_SVD_MAX_SIDE``; randomized otherwise."""
    exact = options.svd == "exact" or (options.svd == "auto" and min(weight.shape) <= EXACT_SVD_MAX_SIDE)
    return Svds(weight, exact)


def choose_rank(options: Options, parts: LinearParts, svds: Svds, target: float,
                measure: Callable[[Svd, Hashable, int], float]) -> Choice:
    """The rank, the model's error with it and the key of the factors to use (a
    :class:`Svds` sketch size, "exact" or "projection"), or a refusal to leave the layer."""
    break_even = low_rank_break_even(parts.in_features, parts.out_features)
    useful = [r for r in range(options.multiple, math.ceil(break_even), options.multiple) if r < break_even]
    top = useful[-1]
    exact = svds.exact
    projections: list[Svd] = []

    def key_of(svd: Svd) -> Hashable:
        """What identifies a factorization across calls: the sketch it comes from."""
        if any(svd is p for p in projections):
            return "projection"
        return "exact" if exact else svd[1].numel()

    def error_at(svd: Svd, rank: int) -> float:
        return measure(svd, key_of(svd), rank)

    def top_projection() -> tuple[Svd, float]:
        """A rank-``top`` factorization and the share of sum(S^2) it keeps (a lower bound)."""
        left, right, energy = project(svds.weight, top)
        projections.append((left, torch.ones(top, dtype=left.dtype), right))
        return projections[-1], energy / svds.total

    if options.ratio is not None or options.energy is not None:
        rank, how, svd = _fixed_rank(options, svds, break_even, top, top_projection)
        if rank is None or rank >= break_even or svd is None:
            needed = f"rank {rank}" if rank is not None else f"a rank above {top}"
            return 0, None, Refusal(NO_SAVING, f"{needed} from {how} is not below the break-even rank "
                                               f"{break_even:.1f}: no saving"), None
        if error_at(svd, rank) > target:
            return 0, error_at(svd, rank), Refusal(OVER_BUDGET, (
                f"rank {rank} from {how} gives output error {error_at(svd, rank):.3g}, "
                f"over this layer's share of the budget ({target:.3g})")), None
        return rank, error_at(svd, rank), None, key_of(svd)

    def within(svd: Svd) -> Callable[[int], bool]:
        return lambda r: error_at(svd, r) <= target

    def no_rank(svd: Svd, how: str = "") -> Choice:
        return 0, error_at(svd, top), Refusal(OVER_BUDGET, (
            f"no rank below the break-even rank {break_even:.1f} keeps the output error within "
            f"budget (rank {top}{how}: {error_at(svd, top):.3g} > {target:.3g})")), None

    sketch, top_checked = top if exact else min(round_up(options.sketch_rank, options.multiple), top), False
    while True:
        svd = svds.top(sketch)
        rank = first_passing([r for r in useful if r <= sketch], within(svd))
        if rank is not None:
            return rank, error_at(svd, rank), None, key_of(svd)
        if sketch == top:
            return no_rank(svd, "" if exact else ", randomized SVD")
        guess = extrapolated_rank(svd[1], error_at(svd, sketch), target)
        if guess > top and not top_checked:  # a flat spectrum: one measurement before any larger sketch
            top_checked, (projection, _) = True, top_projection()
            if not within(projection)(top):
                return no_rank(projection, ", randomized projection")
        sketch = _next_sketch(options, sketch, top, guess)

def _fixed_rank(options: Options, svds: Svds, break_even: float, top: int,
                top_projection: Callable[[], tuple[Svd, float]]) -> tuple[int | None, str, Svd | None]:
    """The rank ``ratio`` or ``energy`` asks for (None: above ``top``) and an SVD covering it."""
    most = min(svds.weight.shape)
    if options.ratio is not None:
        rank = min(round_up(math.ceil(options.ratio * most), options.multiple), most)
        return rank, f"ratio={options.ratio}", svds.top(rank) if rank < break_even else None
    assert options.energy is not None
    how = f"energy={options.energy}"
    sketch, top_checked = most if svds.exact else min(round_up(options.sketch_rank, options.multiple), top), False
    while True:
        svd = svds.top(sketch)
        kept = (svd[1].double().square().cumsum(0) / svds.total).tolist()
        needed = next((i + 1 for i, share in enumerate(kept) if share >= options.energy - 1e-12), None)
        if needed is not None or svds.exact:
            return min(round_up(needed or len(kept), options.multiple), most), how, svd
        if sketch == top:
            return None, how, None
        guess = extrapolated_rank(svd[1], math.sqrt(max(1 - kept[-1], 0.0)), math.sqrt(1 - options.energy))
        if guess > top and not top_checked:  # the kept share is a lower bound, so this may refuse early
            top_checked = True
            if top_projection()[1] < options.energy - 1e-12:
                return None, how, None
        sketch = _next_sketch(options, sketch, top, guess)

def _next_sketch(options: Options, sketch: int, top: int, guess: float) -> int:
    """Double the sketch, or grow it past the extrapolated rank when that is further and below
    ``top`` (a guess beyond ``top`` was just contradicted by the rank-``top`` projection)."""
    reach = round_up(math.ceil(1.25 * guess), options.multiple) if guess < top else 0
    return min(top, max(2 * sketch, reach))


class Svds:
    """Truncated SVDs of one weight, computed as far as asked: exact (float64, all triplets at
    once) or randomized (float32 or wider, the top ``rank`` triplets, recomputed when more are asked)."""

    def __init__(self, weight: torch.Tensor, exact: bool) -> None:
        self.exact = exact
        self.weight = weight.double() if exact else weight.to(torch.promote_types(weight.dtype, torch.float32))
        self.total = float(weight.double().square().sum())  # ||W||_F^2 = sum(S^2)
        self._svd: Svd | None = None

    def top(self, rank: int) -> Svd:
        if self._svd is None or (not self.exact and self._svd[1].numel() < rank):
            self._svd = (torch.linalg.svd(self.weight, full_matrices=False) if self.exact
                         else randomized_svd(self.weight, rank))
            if self.exact:
                self.total = float(self._svd[1].square().sum())
        return self._svd


def extrapolated_rank(sigma: torch.Tensor, error: float, target: float) -> float:
    """The rank at which ``error`` (measured at rank ``len(sigma)``) would fall to ``target`` if the
    singular values kept decaying geometrically as over the sketch's second half and the error
    followed the first one dropped. Only a guess, to order the work: every rank is measured.
    """
    half = len(sigma) // 2
    if half == 0 or not 0 < target < error < math.inf:
        return math.inf
    decay = float(sigma[-1] / sigma[-1 - half]) if float(sigma[-1 - half]) > 0 else 0.0
    if not 0 < decay < 1:
        return math.inf if decay >= 1 else float(len(sigma))
    return len(sigma) + half * math.log(target / error) / math.log(decay)


def saving(parts: LinearParts) -> Callable[[Hashable], float]:
    """Parameters saved by a level (rank, SVD key) of this layer."""
    return lambda level: parts.weight.numel() - level[0] * (parts.in_features + parts.out_features)  # type: ignore[index]


def search_refusal(pick: Pick, codes: Mapping[str, str]) -> Refusal:
    """The skip of a layer the search left alone: ``no-saving`` when no rank below break-even
    exists, otherwise ``over-budget``."""
    reason = pick.reason or f"output error {pick.error:.3g} > {pick.target:.3g}"
    code = codes.get(pick.reason or "", OVER_BUDGET)
    if pick.split == "all":
        return Refusal(code, f"the rank chosen on half the batches failed on the held-out half; chosen again on "
                             f"every batch with half the budget: {reason}")
    return Refusal(code, reason)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
