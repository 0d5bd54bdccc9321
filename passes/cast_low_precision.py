"""Run Linear layers in bfloat16 (or float16) where the error budget allows (opt-in, lossy).

    linear(x, W, b)          =>  to_f32(linear(to_bf16(x), bf16(W), bf16(b)))
    act(linear(x, W, b))     =>  to_f32(act(linear(to_bf16(x), bf16(W), bf16(b))))
    to_bf16(to_f32(y))       =>  y                                  y already bfloat16

Constraints: ``W`` (and ``b``) are float32 constants and ``x`` is float32; the activation
(relu, gelu, silu, sigmoid, tanh, hardswish, hardsigmoid) is the Linear's only user. Softmax,
normalizations and residual adds stay float32, so only the GEMMs (and their epilogues) lose
precision. Each Linear is a site of the budgeted search (fxopt.lossy): ``strategy="sensitivity"``
(default) measures each Linear alone in low precision and converts the cheapest-to-convert
first, keeping in float32 the layers the budget cannot afford; the choice is made on one
half of the batches and verified on the other. Bfloat16 keeps float32's range (no overflow);
float16 has three more mantissa bits but overflows above 65504, which the budget check catches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxopt.errors import PassOptionError
from fxopt.ir import add_constant, call_nodes, dtype_of, infer_val, is_op, linear_parts, ops
from fxopt.lossy import BudgetedSearch, Site, check_search_options
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import NOT_CONSTANT, OVER_BUDGET

to_copy = torch.ops.aten._to_copy.default
ACTIVATIONS = (ops.relu, ops.gelu, ops.silu, ops.sigmoid, ops.tanh, ops.hardswish, ops.hardsigmoid)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CastBF16(Pass):
    name: ClassVar[str] = "cast-bf16"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("merge-siblings", "low-rank", "prune-hidden")

    budget: float = 0.01
    strategy: str = "sensitivity"
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise PassOptionError(f"{self.name}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_search_options(self)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        low = DTYPES[self.dtype]
        sites: list[Site] = []
        for node in call_nodes(gm, ops.linear):
            parts = linear_parts(gm, node)
            result.match()
            if parts is None:
                result.skip(node, Refusal(NOT_CONSTANT, "the Linear's weight or bias is not a constant"))
            elif parts.weight.dtype != torch.float32 or dtype_of(parts.input) != torch.float32:
                result.skip(node, Refusal("not-float32", "the Linear does not run in float32"))
            else:
                sites.append(Site(node.name, (True,), savings=(float(parts.weight.numel()),)))

        def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
            cast_linears(trial, choices, low)
            return trial

        if not sites:
            return result
        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy).run()
        for site in sites:
            if site.name in outcome.refused:
                pick = outcome.refused[site.name]
                result.skip(site.name, Refusal(OVER_BUDGET, f"{self.dtype} gives relative output error "
                                                            f"{pick.error:.3g} > {pick.target:g}"))
                continue
            result.details.append({"node": site.name, "dtype": self.dtype, "error": outcome.picks[site.name].error,
                                   **outcome.details_for(site.name)})
            result.apply()
        apply(gm, outcome.choices)
        gm.recompile()
        return result


@dataclass(frozen=True)
class CastFP16(CastBF16):
    name: ClassVar[str] = "cast-fp16"

    dtype: str = "float16"


def cast_linears(gm: fx.GraphModule, names: Iterable[str], low: torch.dtype) -> None:
    """Run the Linears called ``names`` (float32, constant weights) in ``low`` precision."""
    names = set(names)
    for node in list(gm.graph.nodes):
        if node.name in names:
            _to_low_precision(gm, node, low)
    _drop_round_trips(gm, low)


def _to_low_precision(gm: fx.GraphModule, linear: fx.Node, low: torch.dtype) -> None:
    parts = linear_parts(gm, linear)
    assert parts is not None
    users = list(linear.users)
    activation = users[0] if len(users) == 1 and is_op(users[0], *ACTIVATIONS) and users[0].args[0] is linear else None
    last = activation or linear
    with gm.graph.inserting_before(linear):
        x_low = gm.graph.call_function(to_copy, (parts.input,), {"dtype": low})
    infer_val(x_low)
    weight = add_constant(gm, parts.weight.to(low), f"{parts.weight_node.target}_{low}".replace("torch.", ""))
    args: tuple[Any, ...] = (x_low, weight)
    if parts.bias is not None:
        args += (add_constant(gm, parts.bias.to(low), f"{parts.bias_node.target}_{low}".replace("torch.", "")),)
    linear.args, linear.kwargs = args, {}
    infer_val(linear)
    if activation is not None:
        infer_val(activation)
    with gm.graph.inserting_after(last):
        back = gm.graph.call_function(to_copy, (last,), {"dtype": torch.float32})
    last.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    infer_val(back)


def _drop_round_trips(gm: fx.GraphModule, low: torch.dtype) -> None:
    """``to_low(to_f32(y))`` is ``y`` exactly when ``y`` is already in the low precision."""
    for node in call_nodes(gm, to_copy):
        source = node.args[0]
        if (node.kwargs.get("dtype") == low and is_op(source, to_copy)
                and source.kwargs.get("dtype") == torch.float32
                and dtype_of(source.args[0]) == low):
            node.replace_all_uses_with(source.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
