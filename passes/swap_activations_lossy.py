"""Swap activations for cheaper approximations, each held to an error budget (opt-in).

    gelu(x)                  =>  gelu(x, approximate="tanh")   mapping "gelu->gelu_tanh"
    gelu(x)                  =>  relu(x)                       mapping "gelu->relu"
    gelu(x, "tanh")          =>  relu(x)                       mapping "gelu_tanh->relu"
    silu(x)                  =>  hardswish(x)                  mapping "silu->hardswish"
    sigmoid(x)               =>  hardsigmoid(x)                mapping "sigmoid->hardsigmoid"

Only the swaps named in ``mapping`` run (e.g. ``"gelu->gelu_tanh,silu->hardswish"``); the
mapping is the request, since whether a target is faster depends on the backend. Swaps are
tried one node at a time in graph order, on top of the ones kept so far; each is measured
on every batch (example inputs and calibration data) and kept only while the relative
output error stays within ``budget``. Its error is in the report's details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from fxopt.errors import PassOptionError
from fxopt.ir import arg, call_nodes, ops
from fxopt.pass_api import Pass, PassContext, PassResult

# target name -> (op, kwargs)
TARGETS: dict[str, tuple[Any, dict[str, Any]]] = {
    "gelu_tanh": (ops.gelu, {"approximate": "tanh"}),
    "relu": (ops.relu, {}),
    "hardswish": (ops.hardswish, {}),
    "hardsigmoid": (ops.hardsigmoid, {}),
}
ALLOWED = {
    "gelu": ("gelu_tanh", "relu"),
    "gelu_tanh": ("relu",),
    "silu": ("hardswish",),
    "sigmoid": ("hardsigmoid",),
}


def parse_mapping(text: str) -> dict[str, str]:
    """``"gelu->gelu_tanh, silu->hardswish"`` -> ``{"gelu": "gelu_tanh", "silu": "hardswish"}``."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        source, sep, target = (s.strip() for s in item.partition("->"))
        if not sep:
            raise PassOptionError(f"swap-activations-lossy: cannot parse {item!r}; write source->target")
        if target not in ALLOWED.get(source, ()):
            choices = ", ".join(f"{s}->{t}" for s, ts in ALLOWED.items() for t in ts)
            raise PassOptionError(f"swap-activations-lossy: unsupported swap {item!r} (supported: {choices})")
        if source in mapping:
            raise PassOptionError(f"swap-activations-lossy: {source!r} is mapped twice")
        mapping[source] = target
    return mapping


def _kind(node: fx.Node) -> str:
    if node.target == ops.gelu:
        return "gelu_tanh" if arg(node, 1, "approximate", "none") == "tanh" else "gelu"
    return {ops.silu: "silu", ops.sigmoid: "sigmoid"}[node.target]


@dataclass(frozen=True)
class SwapActivationsLossy(Pass):
    name: ClassVar[str] = "swap-activations-lossy"
    exact: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ("swap-activations",)

    mapping: str = ""
    budget: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_mapping(self.mapping)  # refuse a bad mapping when the pass is configured
        if self.budget < 0:
            raise PassOptionError(f"swap-activations-lossy: budget must be >= 0, got {self.budget}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        mapping = parse_mapping(self.mapping)
        if not mapping:
            result.skip("graph", "no mapping given (e.g. mapping='gelu->gelu_tanh'): nothing to swap")
            return result
        for node in call_nodes(gm, ops.gelu, ops.silu, ops.sigmoid):
            source = _kind(node)
            target = mapping.get(source)
            if target is None:
                continue
            result.match()
            saved = node.target, node.args, node.kwargs
            op, kwargs = TARGETS[target]
            node.target, node.args, node.kwargs = op, (node.args[0],), dict(kwargs)
            gm.recompile()
            error = ctx.output_error(gm)
            swap = f"{source}->{target}"
            if error > self.budget:
                node.target, node.args, node.kwargs = saved
                gm.recompile()
                result.skip(node, f"{swap} gives relative output error {error:.3g} > budget {self.budget:g}")
                continue
            result.details.append({"node": node.name, "swap": swap, "error": error})
            result.stats[swap] += 1
            result.apply()
        return result
