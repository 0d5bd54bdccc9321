"""The built-in demo model: Linear+BatchNorm+Dropout blocks feeding sibling heads."""

from __future__ import annotations

import torch
from torch import nn


class DemoNet(nn.Module):
    """An MLP tower (Linear -> BatchNorm -> ReLU -> Dropout, twice) with three sibling heads,
    the shape of a recommendation or multi-task ranking model."""

    def __init__(self, d_in: int = 512, hidden: int = 1024, heads: tuple[int, ...] = (128, 64, 32)) -> None:
        super().__init__()
        self.tower = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, width) for width in heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.tower(x)
        return tuple(head(h) for head in self.heads)


def build_demo(seed: int = 0, batch: int = 64, d_in: int = 512, hidden: int = 1024) -> tuple[DemoNet, tuple[torch.Tensor]]:
    """The demo model in eval mode with trained-looking BatchNorm statistics, and an input."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DemoNet(d_in, hidden)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    model.eval()
    return model, (torch.randn(batch, d_in, generator=generator),)


def run_demo(passes: str | None = None, batch: int = 64, repeats: int = 30) -> int:
    """``fxopt demo``: optimize the demo model, check its outputs, time it against eager.

    Exact passes must reproduce the outputs to floating-point tolerance; once a lossy pass
    has changed the graph, the outputs are judged against the sum of the budgets of the
    lossy passes that applied (each pass's error is bounded by its budget, measured against
    the graph before it). Returns the exit status: 1 when the outputs are off.
    """
    import fxopt
    from fxopt.ir import count_ops, ops
    from fxopt.latency import measure_side_by_side, speedup
    from fxopt.verify import compare_outputs

    model, inputs = build_demo(batch=batch)
    print(f"demo model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"input {tuple(inputs[0].shape)}")
    opt = fxopt.compile(model, inputs, passes=passes, instruments=[fxopt.PrintProgress()])
    report = opt.report
    print(report)
    with torch.no_grad():
        expected, actual = model(*inputs), opt(*inputs)
    comparison = compare_outputs(list(expected), list(actual))
    errors = f"max abs error {comparison.max_abs:.2e}, max rel error {comparison.max_rel:.2e}"
    lossy = [r for r in report.passes if not r.exact and r.status == "applied" and r.budget is not None]
    if lossy:
        budget = sum(r.budget for r in lossy)
        ok = comparison.mismatch is None and comparison.max_rel <= budget
        names = ", ".join(r.name for r in lossy)
        verdict = "within budget" if ok else "OVER budget"
        print(f"outputs {verdict}: {errors} (budget {budget:g}: {names})")
    else:
        ok = comparison.within()
        print(f"outputs {'match' if ok else 'DIFFER'}: {errors}")
    if comparison.mismatch:
        print(f"  {comparison.mismatch}")
    print(f"weights (parameters and buffers): {report.original.params:,} -> {report.final.params:,}; "
          f"linear layers: {count_ops(opt.graph_module, ops.linear)} in the optimized graph")
    times = measure_side_by_side({"eager": lambda: model(*inputs), "fxopt": lambda: opt(*inputs)},
                                 repeats=repeats)
    ratio = speedup(times["eager"], times["fxopt"])
    print(f"latency (median of {repeats}, interleaved): eager {times['eager']}, fxopt {times['fxopt']}, "
          f"speedup {ratio}")
    if ratio.within_noise:
        print("  ~: the spread is wider than the effect (the speedup's quartile range reaches 1.00x): "
              "no measurable difference in this run")
    return 0 if ok else 1
