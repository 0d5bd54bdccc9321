"""SmoothQuant: move activation outliers into the next Linears' weights, before int8.

    linear(layer_norm(x, g, b), W, c)  =>  linear(layer_norm(x, g / s, b / s), W * s[None, :], c)
    linear(linear(x, V, d), W, c)      =>  linear(linear(x, V / s[:, None], d / s), W * s[None, :], c)
    linear(x, W, c)                    =>  linear(mul(x, 1 / s), W * s[None, :], c)   (explicit=True)
    where s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) over the fit half of the calibration
    batches (X: the value the Linears read; s_j = 1 where either is 0), the same s for every
    Linear reading X; the held-out half stays unseen, so that static int8's held-out check
    after it measures the clipping of ranges it did not see

Exact in real arithmetic: the producer's output channel j is divided by s_j and every Linear
reading it multiplies input channel j by s_j. What it changes is the range of X per channel:
the outlier channels shrink and the weights take them, so per-tensor int8 activations
(quantize-int8 with ``activations='static'``) lose less. Run it right before quantize-int8.

Constraints (refusal codes): every user of X is a Linear reading it as its input
(``shared-intermediate``: a residual or any other reader would see X / s); X comes from a
LayerNorm over the last dim with constant weight and bias, or from a Linear with a constant
weight (``not-foldable``); the weights are constants (``not-constant``) of a float dtype
(``unsupported-dtype``), read by no other node (``shared-constant``); the scales and the new
weights are finite (``not-finite``). With ``explicit=True`` an X whose 1/s cannot be folded
into its producer (``shared-intermediate``, ``not-foldable``) is divided by s in a multiply of
its own that only the Linears read (the form OpenVINO fuses into the activations'
quantization, and the one its own quantizer writes). It is opt-in (not in the default pipeline: alone it
makes nothing faster) and verified at float32's exact tolerance (``budget`` 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import add_constant, arg, constant, infer_val, is_op, ops
from fxopt.lossy import collect_activations, fit_indices, known_values
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.quant import FLOAT_DTYPES
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import (
    NOT_CONSTANT,
    NOT_FINITE,
    SHARED_CONSTANT,
    SHARED_INTERMEDIATE,
    UNSUPPORTED_DTYPE,
)

aten = torch.ops.aten
NOT_FOLDABLE = "not-foldable"
# Channels whose activations or weights stay below this keep s = 1 (nothing to migrate).
MIN_MAGNITUDE = 1e-5


@dataclass(frozen=True)
class SmoothQuant(Pass):
    name: ClassVar[str] = "smooth-quant"
    exact: ClassVar[bool] = False  # exact in real arithmetic; opt-in, checked at float tolerance
    after: ClassVar[tuple[str, ...]] = ("prune-hidden",)
    prepares: ClassVar[bool] = True  # it pays off only through the quantization after it
    alpha: float = 0.5  # how much of the outliers moves into the weights (0: none, 1: all)
    explicit: bool = False  # where 1/s cannot be folded into X's producer, a multiply of its own
    budget: float = 1e-4  # float32's exact tolerance: the rewrite only rounds differently

    def __post_init__(self) -> None:
        super().__post_init__()
        from fxopt.errors import PassOptionError

        if not 0.0 <= self.alpha <= 1.0:
            raise PassOptionError(f"smooth-quant: alpha must be in [0, 1], got {self.alpha}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if is_op(node, ops.linear) and isinstance(node.args[0], fx.Node):
                groups.setdefault(node.args[0], []).append(node)
        foldable: dict[fx.Node, list[fx.Node]] = {}
        explicit: set[fx.Node] = set()
        for value, linears in groups.items():
            for _ in linears:
                result.match()
            refusal = self._refusal(gm, value, linears)
            if (refusal is not None and self.explicit and refusal.code in (SHARED_INTERMEDIATE, NOT_FOLDABLE)
                    and value.meta.get("val") is not None
                    and not any(value in n.args[1:] for n in linears)):
                refusal = _weights_refusal(gm, [n.args[1] for n in linears] + [arg(n, 2, "bias") for n in linears])
                explicit.add(value)
            if refusal is not None:
                for linear in linears:
                    result.skip(linear, refusal)
            else:
                foldable[value] = linears
        if not foldable:
            return result
        # Fit batches only: the held-out ones must stay unseen by what the search after this trials.
        fit = fit_indices(ctx)
        known = known_values(ctx, gm)  # by position in ctx.batches; renumbered for the fit list
        channel_max = collect_activations(gm, foldable, [ctx.batches[i] for i in fit], reduce=_channel_abs_max,
                                          known={at: known[i] for at, i in enumerate(fit) if i in known})
        for value, linears in foldable.items():
            x_max = torch.stack(channel_max[value]).amax(0)
            w_max = torch.stack([constant(gm, n.args[1]).detach().double().abs().amax(0) for n in linears]).amax(0)
            scale = x_max.pow(self.alpha) / w_max.pow(1.0 - self.alpha)
            keep = (x_max < MIN_MAGNITUDE) | (w_max < MIN_MAGNITUDE) | ~torch.isfinite(scale)
            scale = torch.where(keep, torch.ones_like(scale), scale).clamp_min(MIN_MAGNITUDE)
            folded = self._folded(gm, value, linears, scale, fold_producer=value not in explicit)
            if not all(torch.isfinite(t).all() for t in folded.values()):
                for linear in linears:
                    result.skip(linear, Refusal(NOT_FINITE, "the rescaled weights are not finite"))
                continue
            self._rewrite(gm, folded)
            if value in explicit:
                _divide_explicitly(gm, value, linears, scale)
            for _ in linears:
                result.apply()
            result.details.append({"producer": value.name, "linears": [n.name for n in linears],
                                   "max_scale": float(scale.max()), "min_scale": float(scale.min()),
                                   "explicit": value in explicit})
        gm.recompile()
        return result

    def _refusal(self, gm: fx.GraphModule, value: fx.Node, linears: list[fx.Node]) -> Refusal | None:
        others = [u for u in value.users if u not in linears or u.args[0] is not value or value in u.args[1:]]
        if others:
            names = ", ".join(u.name for u in others[:3])
            return Refusal(SHARED_INTERMEDIATE, f"'{value.name}' is also read by {names}: it would see X / s")
        weights = [n.args[1] for n in linears]
        if is_op(value, aten.layer_norm.default):
            shape = arg(value, 1, "normalized_shape")
            weights += [arg(value, 2, "weight"), arg(value, 3, "bias")]
            if shape is None or len(shape) != 1 or weights[-2] is None or weights[-1] is None:
                return Refusal(NOT_FOLDABLE, f"LayerNorm '{value.name}' has no affine weight and bias over the last dim")
        elif is_op(value, ops.linear):
            weights += [arg(value, 1, "weight"), arg(value, 2, "bias")]
        else:
            return Refusal(NOT_FOLDABLE, f"'{value.name}' ({value.target}) is neither a LayerNorm nor a Linear: "
                                         "nothing to fold 1/s into")
        return _weights_refusal(gm, weights)

    @staticmethod
    def _folded(gm: fx.GraphModule, value: fx.Node, linears: list[fx.Node],
                scale: torch.Tensor, fold_producer: bool = True) -> dict[fx.Node, torch.Tensor]:
        """The new constant of each weight node: the producer's divided by s, the readers' times s."""
        folded: dict[fx.Node, torch.Tensor] = {}
        for linear in linears:
            weight = constant(gm, linear.args[1])
            folded[linear.args[1]] = (weight.double() * scale[None, :]).to(weight.dtype)
        if not fold_producer:
            return folded
        if is_op(value, aten.layer_norm.default):
            producer = [(arg(value, 2, "weight"), None), (arg(value, 3, "bias"), None)]
        else:
            producer = [(arg(value, 1, "weight"), slice(None)), (arg(value, 2, "bias"), None)]
        for node, rows in producer:
            if node is None:
                continue
            tensor = constant(gm, node)
            divisor = scale[:, None] if rows is not None else scale
            folded[node] = (tensor.double() / divisor).to(tensor.dtype)
        return folded

    @staticmethod
    def _rewrite(gm: fx.GraphModule, folded: dict[fx.Node, torch.Tensor]) -> None:
        for node, tensor in folded.items():
            replacement = add_constant(gm, tensor, f"{node.target}_smoothed")
            for user in list(node.users):
                user.replace_input_with(node, replacement)
        gm.graph.eliminate_dead_code()


def _weights_refusal(gm: fx.GraphModule, weights: list[fx.Node | None]) -> Refusal | None:
    """Why the constants to rescale cannot be: not constants, not float, or read elsewhere."""
    for node in weights:
        if node is None:
            continue
        tensor = constant(gm, node)
        if tensor is None:
            return Refusal(NOT_CONSTANT, f"'{node.name}' is not a constant")
        if tensor.dtype not in FLOAT_DTYPES:
            return Refusal(UNSUPPORTED_DTYPE, f"'{node.name}' is {tensor.dtype}")
        if len(node.users) != 1:
            return Refusal(SHARED_CONSTANT, f"'{node.name}' is read by {len(node.users)} nodes")
    return None


def _divide_explicitly(gm: fx.GraphModule, value: fx.Node, linears: list[fx.Node], scale: torch.Tensor) -> None:
    """The Linears read ``value / s`` from a multiply of their own; every other reader keeps ``value``."""
    dtype = value.meta["val"].dtype
    reciprocal = add_constant(gm, (1.0 / scale).to(dtype), f"{value.name}_smooth_reciprocal")
    first = min(linears, key=lambda n: list(gm.graph.nodes).index(n))
    with gm.graph.inserting_before(first):
        scaled = gm.graph.call_function(aten.mul.Tensor, (value, reciprocal))
    for linear in linears:
        linear.replace_input_with(value, scaled)
    infer_val(scaled)


def _channel_abs_max(value: torch.Tensor) -> torch.Tensor:
    return value.detach().abs().double().reshape(-1, value.shape[-1]).amax(0)
