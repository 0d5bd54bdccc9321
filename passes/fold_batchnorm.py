"""Fold inference BatchNorm into an adjacent Linear.

    batch_norm(linear(x, W, b))  =>  linear(x, W * s[:, None], (b - mean) * s + beta)
    linear(batch_norm(x), W, b)  =>  linear(x, W * s[None, :], W @ (beta - mean * s) + b)
    where s = gamma / sqrt(var + eps)   (gamma = 1, beta = 0 when affine=False; b = 0 when absent)

Constraints: the BatchNorm uses running statistics (training=False); it normalizes exactly
the Linear's feature dimension, which holds only for 2-D ``(N, C)`` activations (BatchNorm
normalizes dim 1, Linear mixes the last dim); the intermediate has no other users; every
weight and statistic is a finite constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from fxopt.ir import (
    add_constant,
    all_finite,
    call_nodes,
    constant,
    is_op,
    ops,
    replace_node,
    shape_of,
)
from fxopt.pass_api import Pass, PassContext, PassResult


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name: ClassVar[str] = "fold-batchnorm"
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ("remove-dropout",)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for bn in call_nodes(gm, ops.batch_norm):
            result.match()
            reason = self._fold(gm, bn)
            if reason:
                result.skip(bn, reason)
            else:
                result.apply()
        return result

    def _fold(self, gm: fx.GraphModule, bn: fx.Node) -> str | None:
        x, gamma, beta, mean, var, training = bn.args[:6]
        eps = float(bn.args[7]) if len(bn.args) > 7 else 1e-5
        if training:
            return "BatchNorm is in training mode (normalizes with batch statistics)"
        stats = [constant(gm, n) if n is not None else None for n in (gamma, beta, mean, var)]
        if stats[2] is None or stats[3] is None or any(s is None for s, n in zip(stats, (gamma, beta)) if n is not None):
            return "BatchNorm parameters or running statistics are not constants"
        gamma_t, beta_t, mean_t, var_t = (s.double() if s is not None else None for s in stats)
        scale = torch.rsqrt(var_t + eps) * (gamma_t if gamma_t is not None else 1.0)
        shift = (beta_t if beta_t is not None else 0.0) - mean_t * scale

        if is_op(x, ops.linear):
            return self._fold_after(gm, bn, x, scale, shift)
        linears = list(bn.users)
        if linears and all(is_op(u, ops.linear) and u.args[0] is bn and bn not in u.args[1:] for u in linears):
            return self._fold_before(gm, bn, linears, scale, shift)
        return "BatchNorm is not adjacent to a Linear it can fold into"

    def _fold_after(self, gm: fx.GraphModule, bn: fx.Node, linear: fx.Node, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
        reason = _feature_dim_reason(linear)
        if reason:
            return reason
        if len(linear.users) != 1:
            return "the Linear's output is also used elsewhere"
        weight, bias = _weights(gm, linear)
        if weight is None:
            return "the Linear's weight is not a constant"
        compute = _weight_compute_dtype(weight)
        new_w = weight.to(compute) * scale.to(compute)[:, None]
        new_b = (bias.double() if bias is not None else 0.0) * scale + shift
        if not _finite(new_w, new_b, scale, shift):
            return "weights or BatchNorm statistics are not finite; folding could move NaN/Inf"
        _set_weights(gm, linear, new_w.to(weight.dtype), new_b.to(weight.dtype))
        replace_node(bn, linear)
        return None

    def _fold_before(self, gm: fx.GraphModule, bn: fx.Node, linears: list[fx.Node], scale: torch.Tensor, shift: torch.Tensor) -> str | None:
        x_shape = shape_of(bn.args[0])
        if x_shape is None or len(x_shape) != 2:
            return (f"BatchNorm normalizes dim 1 of a {len(x_shape or ())}-D input but the Linear mixes the "
                    "last dim: they coincide only for 2-D (N, C) activations")
        folded = []
        for linear in linears:
            weight, bias = _weights(gm, linear)
            if weight is None:
                return "the Linear's weight is not a constant"
            compute = _weight_compute_dtype(weight)
            new_w = weight.to(compute) * scale.to(compute)[None, :]
            new_b = (weight.to(compute) @ shift.to(compute)).double() + (bias.double() if bias is not None else 0.0)
            if not _finite(weight, new_w, new_b, scale, shift):
                return "weights or BatchNorm statistics are not finite; folding could move NaN/Inf"
            folded.append((linear, new_w.to(weight.dtype), new_b.to(weight.dtype)))
        for linear, new_w, new_b in folded:
            _set_weights(gm, linear, new_w, new_b)
            linear.replace_input_with(bn, bn.args[0])
        gm.graph.erase_node(bn)
        return None


def _feature_dim_reason(linear: fx.Node) -> str | None:
    out_shape = shape_of(linear)
    if out_shape is None or len(out_shape) != 2:
        return (f"BatchNorm normalizes dim 1 of the Linear's {len(out_shape or ())}-D output but the "
                "Linear's features are the last dim: they coincide only for 2-D (N, C) activations")
    return None


def _weights(gm: fx.GraphModule, linear: fx.Node) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    weight = constant(gm, linear.args[1])
    bias_node = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    bias = constant(gm, bias_node)
    if bias_node is not None and bias is None:
        return None, None
    return weight, bias


def _set_weights(gm: fx.GraphModule, linear: fx.Node, weight: torch.Tensor, bias: torch.Tensor) -> None:
    hint = str(linear.args[1].target)
    w_node = add_constant(gm, weight.contiguous(), f"{hint}_bnfold")
    b_node = add_constant(gm, bias.contiguous(), f"{hint}_bnfold_bias")
    linear.args = (linear.args[0], w_node, b_node)
    linear.kwargs = {}


def _weight_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 weights: a product of two fp32 values rounds once either
    way, and a float64 copy of a large weight matrix would double the pass's peak memory."""
    return torch.promote_types(weight.dtype, torch.float32)


def _finite(*tensors: torch.Tensor | float) -> bool:
    return all_finite(*(t for t in tensors if isinstance(t, torch.Tensor)))
