"""swap-activations-lossy through the budgeted search: strategies and held-out verification."""

import torch
from fxopt.passes import SwapActivationsLossy

from fxopt import compile as compile_model
from fxopt.ir import ops
from fxopt.testing import assert_skipped, run_pass


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 4)).eval()


def test_swaps_are_fitted_on_half_the_batches_and_verified_on_the_other() -> None:
    net = model()
    g = torch.Generator().manual_seed(1)
    x, calibration = torch.randn(16, 8, generator=g), [(torch.randn(16, 8, generator=g),) for _ in range(3)]
    swap = SwapActivationsLossy(mapping="gelu->gelu_tanh", budget=0.01)
    opt = compile_model(net, (x,), passes=[swap], calibration=calibration)
    record = opt.report["swap-activations-lossy"]
    assert record.applied == 2
    for detail in record.details:
        assert detail["heldout_batches"] == 2
        assert 0 < detail["fitted_error"] <= 0.01 and 0 < detail["heldout_error"] <= 0.01
    with torch.no_grad():
        fresh = torch.randn(16, 8, generator=g)
        assert float((opt(fresh) - net(fresh)).abs().max() / net(fresh).abs().max()) <= 0.015


def relu_error(net: torch.nn.Module, positions: tuple[int, ...], x: torch.Tensor) -> float:
    """The relative output error of ``net`` with the GELUs at ``positions`` made ReLUs."""
    swapped = torch.nn.Sequential(*(torch.nn.ReLU() if i in positions else m for i, m in enumerate(net)))
    with torch.no_grad():
        expected = net(x)
        return float((swapped(x) - expected).abs().max() / expected.abs().max())


def test_sensitivity_keeps_the_cheaper_swap_where_graph_order_kept_the_costly_one() -> None:
    """The first GELU's swap costs more than the second's; the budget holds either alone but
    not both. Graph order would keep the costly first one; sensitivity keeps the cheap one."""
    net = model()
    with torch.no_grad():
        net[0].bias.fill_(-0.3)  # pre-activations near zero: gelu and relu differ most there
        net[2].bias.fill_(2.0)  # mostly positive: gelu is close to relu
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    costly, cheap = relu_error(net, (1,), x), relu_error(net, (3,), x)
    budget = 1.05 * costly
    assert cheap < costly < budget < relu_error(net, (1, 3), x)  # the premise
    swap = SwapActivationsLossy(mapping="gelu->relu", budget=budget)
    run = run_pass(swap, net, (x,))
    assert [d["node"] for d in run.record.details] == ["gelu_1"]
    assert run.count(ops.relu) == 1 and run.record.max_rel_err <= budget
    assert_skipped(run, "gelu->relu gives relative output error", node="gelu")
    in_order = run_pass(SwapActivationsLossy(mapping="gelu->relu", budget=budget,
                                                          strategy="equal-share"), net, (x,))
    assert in_order.record.max_rel_err <= budget
