"""Swap activations for cheaper approximations, each held to an error budget (opt-in).

    gelu(x)                  =>  gelu(x, approximate="tanh")   mapping "gelu->gelu_tanh"
    gelu(x)                  =>  relu(x)                       mapping "gelu->relu"
    gelu(x, "tanh")          =>  relu(x)                       mapping "gelu_tanh->relu"
    silu(x)                  =>  hardswish(x)                  mapping "silu->hardswish"
    sigmoid(x)               =>  hardsigmoid(x)                mapping "sigmoid->hardsigmoid"

Only the swaps named in ``mapping`` run (e.g. ``"gelu->gelu_tanh,silu->hardswish"``); the
mapping is the request, since whether a target is faster depends on the backend. Each
matched node is a site of the budgeted search (fxopt.lossy) with one level, swapped or not:
``strategy="sensitivity"`` (default) measures each swap alone, then keeps them in order of
least error, each while the combined relative output error stays within ``budget``;
``"equal-share"`` goes in graph order, each swap within its share. The choice is made on one
half of the batches and verified on the other; the error at each swap and both the fitted
and held-out errors are in the report's details.
Refusal codes: ``over-budget`` (a swap whose error does not fit the budget or its share),
``no-mapping`` (no ``mapping`` given: the pass has nothing to swap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from fxopt.errors import PassOptionError
from fxopt.ir import arg, call_nodes, ops
from fxopt.lossy import BudgetedSearch, Site, check_search_options
from fxopt.pass_api import Pass, PassContext, PassResult
from fxopt.rewrite import Refusal
from fxopt.rewrite.constraints import NO_MAPPING, OVER_BUDGET

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
    strategy: str = "sensitivity"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_mapping(self.mapping)  # refuse a bad mapping when the pass is configured
        check_search_options(self)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        mapping = parse_mapping(self.mapping)
        if not mapping:
            result.skip("graph", Refusal(NO_MAPPING, "no mapping given (e.g. mapping='gelu->gelu_tanh'): "
                                                 "nothing to swap"))
            return result
        sites: list[Site] = []
        for node in call_nodes(gm, ops.gelu, ops.silu, ops.sigmoid):
            source = _kind(node)
            target = mapping.get(source)
            if target is None:
                continue
            result.match()
            sites.append(Site(node.name, (True,), payload=f"{source}->{target}"))
        swaps = {site.name: site.payload for site in sites}

        def apply(trial: fx.GraphModule, choices: Mapping[str, object]) -> fx.GraphModule:
            for node in list(trial.graph.nodes):
                if node.name in choices:
                    op, kwargs = TARGETS[swaps[node.name].split("->")[1]]
                    node.target, node.args, node.kwargs = op, (node.args[0],), dict(kwargs)
            return trial

        outcome = BudgetedSearch(gm, ctx, sites, apply, self.budget, self.strategy).run()
        for site in sites:
            swap = swaps[site.name]
            if site.name in outcome.refused:
                pick = outcome.refused[site.name]
                limit = f"budget {self.budget:g}"
                if pick.split != "fit":
                    limit = (f"{pick.target:g} (half the budget: chosen again on every batch after the held-out "
                             "check failed)")
                result.skip(site.name, Refusal(OVER_BUDGET, f"{swap} gives relative output error {pick.error:.3g} > {limit}"))
                continue
            result.details.append({"node": site.name, "swap": swap, "error": outcome.picks[site.name].error,
                                   **outcome.details_for(site.name)})
            result.stats[swap] += 1
            result.apply()
        apply(gm, outcome.choices)
        gm.recompile()
        return result
