"""Numerical verification: run a graph, compare outputs, and lint the pass contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

# Relative tolerance (max |a - b| over max |a|) an exact pass must meet, per dtype.
# Exact rewrites reorder float sums (merged weights, folded scales), so fp32 gets a few
# ulps of headroom times the depth of a typical reduction.
EXACT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


def exact_tolerance(dtype: torch.dtype) -> float:
    return EXACT_RTOL.get(dtype, 0.0)


@dataclass
class Comparison:
    """How far ``actual`` is from ``expected``, over every output tensor."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch: str | None = None  # structural difference: shapes, dtypes, NaN pattern
    worst_dtype: torch.dtype = torch.float32

    def within(self, rtol: float | None = None) -> bool:
        if self.mismatch:
            return False
        limit = exact_tolerance(self.worst_dtype) if rtol is None else rtol
        return self.max_rel <= limit

    def merge(self, other: Comparison) -> Comparison:
        if other.max_rel >= self.max_rel:
            self.worst_dtype = other.worst_dtype
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.mismatch = self.mismatch or other.mismatch
        return self


def run_graph(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[Any]:
    with torch.no_grad():
        out = gm(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare_outputs(expected: Sequence[Any], actual: Sequence[Any]) -> Comparison:
    """Compare two flat output lists. Relative error is normalized per output tensor by
    its largest finite magnitude, so near-zero elements do not inflate it."""
    result = Comparison()
    if len(expected) != len(actual):
        result.mismatch = f"{len(actual)} outputs instead of {len(expected)}"
        return result
    for i, (a, b) in enumerate(zip(expected, actual)):
        result.merge(_compare_one(i, a, b))
    return result


def _compare_one(index: int, expected: Any, actual: Any) -> Comparison:
    out = Comparison()
    if not isinstance(expected, torch.Tensor):
        if expected != actual:
            out.mismatch = f"output {index} changed from {expected!r} to {actual!r}"
        return out
    if not isinstance(actual, torch.Tensor):
        out.mismatch = f"output {index} is no longer a tensor"
        return out
    if expected.shape != actual.shape:
        out.mismatch = f"output {index} shape changed from {tuple(expected.shape)} to {tuple(actual.shape)}"
        return out
    if expected.dtype != actual.dtype:
        out.mismatch = f"output {index} dtype changed from {expected.dtype} to {actual.dtype}"
        return out
    out.worst_dtype = expected.dtype
    if not expected.is_floating_point():
        if not torch.equal(expected, actual):
            out.mismatch = f"output {index} ({expected.dtype}) changed"
        return out
    e, a = expected.detach().double().cpu(), actual.detach().double().cpu()
    e_nan, a_nan = torch.isnan(e), torch.isnan(a)
    if not torch.equal(e_nan, a_nan):
        out.mismatch = f"output {index}: NaN pattern changed ({int(e_nan.sum())} NaN before, {int(a_nan.sum())} after)"
        return out
    e_inf, a_inf = torch.isinf(e), torch.isinf(a)
    if not torch.equal(e_inf, a_inf) or not torch.equal(e[e_inf], a[a_inf]):
        out.mismatch = f"output {index}: infinities changed"
        return out
    finite = ~(e_nan | e_inf)
    if finite.any():
        diff = (e[finite] - a[finite]).abs().max().item()
        scale = e[finite].abs().max().item()
        out.max_abs = diff
        out.max_rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return out


def lint(gm: fx.GraphModule) -> str | None:
    """A reason the graph is malformed, or None: fx lint, dangling attributes, outputs."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for atom in str(node.target).split("."):
                obj = getattr(obj, atom, None)
            if obj is None:
                return f"node '{node.name}' reads attribute '{node.target}', which does not exist"
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        return "graph must have exactly one output node"
    try:
        gm.graph.lint()
    except Exception as exc:
        return f"graph lint failed: {exc}"
    return None



def module_fingerprint(module: torch.nn.Module) -> tuple[Any, ...]:
    """Everything invariant 1 protects: module tree, train/eval flags, tensor versions."""
    tree = tuple((name, type(m).__name__, m.training) for name, m in module.named_modules())
    state = tuple(
        (name, t.data_ptr(), t._version, tuple(t.shape), t.dtype)
        for name, t in module.state_dict(keep_vars=True).items()
    )
    return tree, state
