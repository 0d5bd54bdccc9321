"""Error-aware scales for weight-only quantization: an activation-weighted clip search.

Absmax scales (:func:`fxopt.quant.quantize_weight_groupwise`) spend the quantization grid on a
group's largest weight. A narrower range rounds every other weight more finely at the cost of
clipping the few largest; which is better depends on how much each input feature matters. For
each group (one output row at 8 bits per channel, ``group_size`` inputs otherwise) this tries
a grid of clip ratios and keeps the one that minimizes the activation-weighted error

    sum_k d_k (w_k - w_hat_k)^2,    d_k = E[x_k^2] over the calibration activations

(the diagonal of the layer's input second moment, as AWQ's and the imatrix's weighting; with
``d = 1`` the plain weight MSE): a coarse grid, then steps around each group's best. At 4 bits
the integer zero point is searched with the scale: once the ratio is chosen, the zero points
next to the one the range rounds to are tried too.
At 8 bits the codes use all of int8's [-128, 127]: a group whose largest magnitude is negative
gets a scale 127/128 as wide as symmetric [-127, 127] needs.

The result has the layout of :func:`fxopt.quant.quantize_weight_groupwise` (``q`` int8, ``s``
float32 per group, ``z`` int8 in [0, 15] at 4 bits), so every kernel and lowering of
``fxopt::weight_only_linear`` takes it as it is. The search runs in float32 on blocks of rows
small enough to stay in cache: besides the result it holds one float copy of a block and two
scratch buffers of its size, never a float copy of the whole weight. It runs on one thread:
its many small operations each cost a parallel region, and where the CPUs are shared with
other work a region waits for a descheduled thread (measured on 2 busy cores: one 5632x2048
weight took 0.12 s on one thread, 0.35 to 7 s on two).
"""

from __future__ import annotations

import torch

from fxopt.quant import WEIGHT_ONLY_BITS

# Clip ratios: each group tries a coarse grid, then steps around its best (halving the step),
# then (4 bits) the zero points next to the one its range rounds to. Chosen by measuring on
# Gaussian and Student-t weights with and without a few heavy input features: the best ratio
# lay in 0.9-1.0 at 8 bits and 0.7-1.0 at 4 bits, and at 8 bits steps finer than 0.01 still
# lowered the weighted error by a tenth where a few features dominate it.
COARSE_RATIOS = {8: (1.0, 0.98, 0.96, 0.94, 0.92, 0.90), 4: (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)}
REFINE_STEPS = {8: (0.01, 0.005, 0.0025), 4: (0.025, 0.0125)}
ZERO_SHIFTS = (-1, 1)
# Elements per block of rows: 1 MiB of float32, so that the block and its two scratch buffers
# stay in cache while every candidate is tried on them.
BLOCK_ELEMENTS = 1 << 18


def search_weight_groupwise(weight: torch.Tensor, bits: int, group_size: int | None,
                            importance: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q [out, in] int8, scale [out, groups] float32, zero [out, groups] int8 | None)`` of a
    2-D ``weight`` with each group's clip ratio (and, at 4 bits, zero point) chosen to minimize
    ``sum_k importance_k (w_k - w_hat_k)^2``. ``importance``: ``[in]`` non-negative weights of
    the input features (None: all 1)."""
    if bits not in WEIGHT_ONLY_BITS:
        raise ValueError(f"weight-only quantization takes bits in {WEIGHT_ONLY_BITS}, got {bits}")
    if weight.dim() != 2:
        raise ValueError(f"the weight must be 2-D, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    if in_features % size:
        raise ValueError(f"{in_features} input features do not divide into groups of {size}")
    groups = in_features // size
    if importance is None:
        importance = torch.ones(in_features, device=weight.device)
    if importance.shape != (in_features,):
        raise ValueError(f"importance must have shape ({in_features},), got {tuple(importance.shape)}")
    # sum_k d_k e_k^2 as a squared norm of e * sqrt(d): one pass fewer per candidate
    root_d = importance.detach().to(weight.device, torch.float32).clamp(min=0).sqrt().reshape(groups, size)
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, groups, device=weight.device)
    zero = torch.empty(out_features, groups, dtype=torch.int8, device=weight.device) if bits == 4 else None
    rows = max(1, BLOCK_ELEMENTS // in_features)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _search_rows(weight, q, scale, zero, root_d, bits, rows)
    finally:
        torch.set_num_threads(threads)
    return q, scale, zero


def _search_rows(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 root_d: torch.Tensor, bits: int, rows: int) -> None:
    """Fill ``q``, ``scale`` and ``zero`` block of ``rows`` rows by block."""
    groups, size = root_d.shape
    with torch.no_grad():
        for start in range(0, weight.shape[0], rows):
            search = _BlockSearch(weight[start:start + rows].detach().float().reshape(-1, groups, size), root_d, bits)
            s, z = search.run()
            q[start:start + rows] = search.codes(s, z).reshape(-1, groups * size).to(torch.int8)
            scale[start:start + rows] = s
            if zero is not None:
                zero[start:start + rows] = z.to(torch.int8)


class _BlockSearch:
    """The search on one block ``[rows, groups, size]`` of the weight, in two scratch buffers."""

    def __init__(self, block: torch.Tensor, root_d: torch.Tensor, bits: int) -> None:
        self.block, self.root_d, self.bits = block, root_d, bits
        self.scaled, self.rounded = torch.empty_like(block), torch.empty_like(block)
        if bits == 8:  # the smallest scale that holds the group in [-128, 127] without clipping
            self.full = torch.maximum(block.amax(-1).clamp(min=0) / 127, block.amin(-1).clamp(max=0) / -128)
            self.zero = None
        else:  # the group's range, widened to hold 0, over [0, 15]
            low, high = block.amin(-1).clamp(max=0), block.amax(-1).clamp(min=0)
            self.full = (high - low) / 15
            self.zero = torch.round(-low / self.full.clamp(min=1e-12))  # the same at every ratio
        self.full = self.full.clamp(min=1e-12)

    def run(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        best_error = best_ratio = None
        for ratio in COARSE_RATIOS[self.bits]:
            ratios = torch.full_like(self.full, ratio)
            error = self.error(self.full * ratios, self.zero)
            if best_error is None:
                best_error, best_ratio = error, ratios
            else:
                best_error, best_ratio = _keep_better(error, ratios, best_error, best_ratio)
        for step in REFINE_STEPS[self.bits]:
            for ratios in (best_ratio - step, best_ratio + step):
                best_error, best_ratio = _keep_better(self.error(self.full * ratios, self.zero), ratios,
                                                      best_error, best_ratio)
        scale, zero = self.full * best_ratio, self.zero
        if zero is not None:
            start = zero
            for shift in ZERO_SHIFTS:
                shifted = (start + shift).clamp(0, 15)
                best_error, zero = _keep_better(self.error(scale, shifted), shifted, best_error, zero)
        return scale, zero

    def codes(self, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The integer codes (as floats, in a scratch buffer) at scale ``s`` and zero ``z``:
        ``round(w / s + z)`` clamped to the range; ``self.scaled`` keeps ``w / s + z``."""
        if z is None:
            torch.mul(self.block, s.reciprocal()[..., None], out=self.scaled)
        else:
            torch.addcmul(z[..., None], self.block, s.reciprocal()[..., None], out=self.scaled)
        low, high = (-128, 127) if z is None else (0, 15)
        return torch.round(self.scaled, out=self.rounded).clamp_(low, high)

    def error(self, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """``sum_k d_k (w_k - w_hat_k)^2`` per group: ``w - w_hat = s (w / s + z - code)``."""
        difference = self.codes(s, z).sub_(self.scaled).mul_(self.root_d)
        return torch.linalg.vector_norm(difference, dim=-1).square_().mul_(s.square())


def _keep_better(error: torch.Tensor, choice: torch.Tensor, best_error: torch.Tensor,
                 best_choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the candidate with the lower error (ties keep the earlier one)."""
    better = error < best_error
    return torch.where(better, error, best_error), torch.where(better, choice, best_choice)
