"""Named constraints, written once and shared by every rule that needs them.

Each returns None when it holds and a :class:`Refusal` with its code when it does not, so a
rule's ``check`` reads as a list of conditions::

    def check(self, m):
        return (constant_linear(m.gm, m.linear) or sole_user(m.linear, m.bn)
                or bn_normalizes_features(m.linear) or finite(m.weight, m.bias))
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import all_finite, arg, constant, constant_users, dtype_of, linear_parts, shape_of
from fxopt.rewrite.refusal import Refusal

SHARED_INTERMEDIATE = "shared-intermediate"
SHARED_CONSTANT = "shared-constant"
NOT_FINITE = "not-finite"
NOT_CONSTANT = "not-constant"
DTYPE_MISMATCH = "dtype-mismatch"
NOT_FLOATING_POINT = "not-floating-point"
CHANGES_SHAPE_OR_DTYPE = "changes-shape-or-dtype"
BN_TRAINING = "bn-training"
BN_NOT_ON_FEATURES = "bn-not-on-features"
DROPOUT_ACTIVE = "dropout-active"
NOT_CHEAPER = "not-cheaper"
# The lossy passes' own reasons, shared across them so the report groups them alike.
OVER_BUDGET = "over-budget"  # the budgeted search measured the site's error over its budget or share
TOO_SMALL = "too-small"  # below the size where the rewrite pays (or leaves anything to remove)
NO_SAVING = "no-saving"  # the rewritten form would not be smaller (a rank at or above break-even)
EXCLUDED = "excluded"  # left out by the user's options (skip_first, skip_last, include, exclude)
NEEDS_CALIBRATION = "needs-calibration"  # the pass needs calibration batches and got none
NO_MAPPING = "no-mapping"  # the pass was given nothing to do (an empty mapping)
UNSUPPORTED_DTYPE = "unsupported-dtype"  # floating point, but not a dtype the rewrite handles
NOT_ELEMENTWISE = "not-elementwise"  # an activation that mixes more than one value per output
COPY_PAST_MEMORY_BOUND = "copy-past-memory-bound"  # a copy of the model's weights in a model past the bound


def _names(nodes: Iterable[fx.Node], limit: int = 3) -> str:
    return ", ".join(sorted(n.name for n in nodes)[:limit])


def sole_user(value: fx.Node | None, *users: fx.Node) -> Refusal | None:
    """``value`` is read only by ``users``: the rewrite that consumes it can remove it.
    (None, an optional node that is absent, holds trivially.)"""
    return private_region((value,) if value is not None else (), users)


def private_region(nodes: Iterable[fx.Node], region: Collection[fx.Node]) -> Refusal | None:
    """No node of ``nodes`` is read from outside ``nodes`` and ``region``: a rewrite that
    replaces the region removes all of them, rather than computing both old and new."""
    nodes = list(nodes)
    inside = set(nodes) | set(region)
    for node in nodes:
        outside = [u for u in node.users if u not in inside]
        if outside:
            return Refusal(SHARED_INTERMEDIATE, f"the intermediate {node.name} is also used by {_names(outside)}: "
                                                "the rewrite could not remove it")
    return None


def private_constant(gm: fx.GraphModule, const_node: fx.Node | None, user: fx.Node, what: str = "weight") -> Refusal | None:
    """The tensor behind ``const_node`` is read by ``user`` alone, through any name (tied
    weights count as shared): rewriting it then replaces it instead of storing a copy."""
    if const_node is None:
        return None
    others = [u for u in constant_users(gm, const_node) if u is not user]
    if others:
        return Refusal(SHARED_CONSTANT, f"its {what} tensor is also used by {_names(others)}: the rewrite "
                                        "would store a changed copy and keep the original")
    return None


def private_linear(gm: fx.GraphModule, *linears: fx.Node) -> Refusal | None:
    """Each Linear's weight and bias are read by that Linear alone (see :func:`private_constant`)."""
    for linear in linears:
        refusal = (private_constant(gm, arg(linear, 1, "weight"), linear, "weight")
                   or private_constant(gm, arg(linear, 2, "bias"), linear, "bias"))
        if refusal:
            return refusal
    return None


def constant_linear(gm: fx.GraphModule, *linears: fx.Node) -> Refusal | None:
    """Each Linear's weight is a 2-D constant and its bias a constant or absent
    (:func:`fxopt.ir.linear_parts` then takes it apart)."""
    for linear in linears:
        if linear_parts(gm, linear) is None:
            return Refusal(NOT_CONSTANT, f"the weight or bias of {linear.name} is not a constant")
    return None


def quantizable_linear(gm: fx.GraphModule, linear: fx.Node) -> Refusal | None:
    """The Linear's weight and bias are constants (:func:`constant_linear`) and its weight is
    float32, float16 or bfloat16: what a quantizing rewrite reads."""
    from fxopt.quant import FLOAT_DTYPES

    refusal = constant_linear(gm, linear)
    if refusal is not None:
        return refusal
    weight = constant(gm, linear.args[1])
    if weight.dtype not in FLOAT_DTYPES:
        return Refusal(UNSUPPORTED_DTYPE, f"weight dtype {weight.dtype} is not one of float32, float16, bfloat16")
    return None


def constant_or_absent(gm: fx.GraphModule, *nodes: fx.Node | None, what: str = "the weights") -> Refusal | None:
    """Each of ``nodes`` is a constant tensor or absent (None, an optional argument)."""
    if all(n is None or constant(gm, n) is not None for n in nodes):
        return None
    return Refusal(NOT_CONSTANT, f"{what} are not constants")


def calibrated(ctx: Any, what: str) -> Refusal | None:
    """The compile has calibration batches, which ``what`` (static scales) are observed on:
    scales from the example inputs alone could clip later inputs."""
    if ctx.calibrated:
        return None
    return Refusal(NEEDS_CALIBRATION, f"{what} need calibration batches (calibration=[...]); scales from the "
                                      "example inputs alone could clip later inputs")


def finite(*tensors: torch.Tensor | float | None, what: str = "the weights") -> Refusal | None:
    """No NaN or Inf in ``tensors`` (numbers and None are skipped): folding or merging a
    non-finite value would move where NaN/Inf appear in the outputs."""
    if all_finite(*(t for t in tensors if isinstance(t, torch.Tensor))):
        return None
    return Refusal(NOT_FINITE, f"{what} are not finite; the rewrite could move NaN/Inf")


def same_dtype(*tensors: torch.Tensor | None) -> Refusal | None:
    """All of ``tensors`` (None skipped) have one dtype."""
    dtypes = list(dict.fromkeys(t.dtype for t in tensors if t is not None))
    if len(dtypes) > 1:
        return Refusal(DTYPE_MISMATCH, f"the tensors have different dtypes ({', '.join(map(str, dtypes))})")
    return None


def floating_point(node: fx.Node) -> Refusal | None:
    """``node`` is a floating-point tensor."""
    dtype = dtype_of(node)
    if dtype is None or not dtype.is_floating_point:
        return Refusal(NOT_FLOATING_POINT, f"{node.name} is not a floating-point tensor ({dtype})")
    return None


def same_shape_and_dtype(result: fx.Node, like: fx.Node) -> Refusal | None:
    """``result`` has ``like``'s shape and dtype: no broadcast, no type promotion."""
    if dtype_of(result) != dtype_of(like) or shape_of(result) != shape_of(like):
        return Refusal(CHANGES_SHAPE_OR_DTYPE, f"{result.name} differs from {like.name} in shape or dtype "
                                               "(broadcast or type promotion)")
    return None


def bn_running_stats(bn: fx.Node) -> Refusal | None:
    """The BatchNorm normalizes with its running statistics (``training=False``)."""
    if arg(bn, 5, "training", False):
        return Refusal(BN_TRAINING, "BatchNorm is in training mode (normalizes with batch statistics)")
    return None


def bn_normalizes_features(activation: fx.Node) -> Refusal | None:
    """A BatchNorm on ``activation`` normalizes the dimension a Linear mixes.

    BatchNorm normalizes dim 1 and a Linear mixes the last dim: they coincide only for 2-D
    ``(N, C)`` activations. ``(N, C, L)`` with ``L == C`` fits the shapes, not the math.
    """
    shape = shape_of(activation)
    if shape is None or len(shape) != 2:
        return Refusal(BN_NOT_ON_FEATURES, f"BatchNorm normalizes dim 1 of a {len(shape or ())}-D input but the "
                                           "Linear mixes the last dim: they coincide only for 2-D (N, C) activations")
    return None


def dropout_inactive(node: fx.Node) -> Refusal | None:
    """The dropout is the identity: ``train=False`` or ``p == 0``."""
    if arg(node, 2, "train", True) and float(arg(node, 1, "p", 0.5)) > 0:
        return Refusal(DROPOUT_ACTIVE, "dropout is active (train=True, p>0): it is random, not the identity")
    return None


def not_costlier(after: float, before: float, detail: str, *, force: bool = False) -> Refusal | None:
    """The rewritten form costs no more than the original (``force`` waives the cost model).
    ``detail`` names the costs, e.g. the FLOPs of both forms."""
    if after > before and not force:
        return Refusal(NOT_CHEAPER, detail)
    return None


def no_copy_past_memory_bound(copied_bytes: int, past_bound: bool, what: str) -> Refusal | None:
    """``what`` makes no copy of weights the model holds (``copied_bytes``) in a model whose
    weights exceed the compile's memory bound (:meth:`fxopt.evidence.Evidence.past_memory_bound`):
    there memory, not a few percent of speed, decides whether the model compiles at all."""
    if past_bound and copied_bytes:
        size = f"{copied_bytes / 2**20:.1f} MiB" if copied_bytes >= 2**20 else f"{copied_bytes} bytes"
        return Refusal(COPY_PAST_MEMORY_BOUND, f"{what} would copy {size} of the model's weights, and they "
                       "exceed the compile's memory bound (memory_bound= raises it)")
    return None


def large_enough(size: int, minimum: int, detail: str) -> Refusal | None:
    """``size`` (weights, features, hidden units) reaches ``minimum``: below it the lossy
    rewrite saves less than it costs, or finds nothing to remove. ``detail`` names both."""
    if size < minimum:
        return Refusal(TOO_SMALL, detail)
    return None


def floating_weight(weight: torch.Tensor, detail: str) -> Refusal | None:
    """``weight`` is a floating-point tensor (an integer weight has no rounding to trade)."""
    if not weight.is_floating_point():
        return Refusal(NOT_FLOATING_POINT, detail)
    return None


__all__ = [
    "BN_NOT_ON_FEATURES", "BN_TRAINING", "CHANGES_SHAPE_OR_DTYPE", "DROPOUT_ACTIVE", "DTYPE_MISMATCH",
    "EXCLUDED", "NEEDS_CALIBRATION", "NOT_CHEAPER", "NOT_CONSTANT", "NOT_ELEMENTWISE", "NOT_FINITE",
    "NOT_FLOATING_POINT", "NO_MAPPING", "NO_SAVING", "OVER_BUDGET", "SHARED_CONSTANT",
    "SHARED_INTERMEDIATE", "TOO_SMALL", "UNSUPPORTED_DTYPE", "bn_normalizes_features", "bn_running_stats",
    "constant_linear", "constant_or_absent", "dropout_inactive", "finite", "floating_point",
    "floating_weight", "large_enough", "not_costlier",
    "private_constant", "private_linear", "private_region", "same_dtype", "same_shape_and_dtype",
    "sole_user",
]
