"""swap-activations-lossy through the budgeted search: strategies and held-out verification."""

import torch

import fxopt
from fxopt.ir import ops
from fxopt.testing import run_pass


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 4)).eval()


def test_swaps_are_fitted_on_half_the_batches_and_verified_on_the_other() -> None:
    net = model()
    g = torch.Generator().manual_seed(1)
    x, calibration = torch.randn(16, 8, generator=g), [(torch.randn(16, 8, generator=g),) for _ in range(3)]
    swap = fxopt.passes.SwapActivationsLossy(mapping="gelu->gelu_tanh", budget=0.01)
    opt = fxopt.compile(net, (x,), passes=[swap], calibration=calibration)
    record = opt.report["swap-activations-lossy"]
    assert record.applied == 2
    for detail in record.details:
        assert detail["heldout_batches"] == 2
        assert 0 < detail["fitted_error"] <= 0.01 and 0 < detail["heldout_error"] <= 0.01
    with torch.no_grad():
        fresh = torch.randn(16, 8, generator=g)
        assert float((opt(fresh) - net(fresh)).abs().max() / net(fresh).abs().max()) <= 0.015


def test_sensitivity_keeps_the_cheaper_swap_when_only_one_fits() -> None:
    """gelu->relu costs far more on the wide layer (scaled up 10x) than on the narrow one; the
    budget holds only one: sensitivity keeps the cheap one whatever the graph order."""
    net = model()
    with torch.no_grad():
        net[2].weight.mul_(10.0)
        net[2].bias.mul_(10.0)
    x = torch.randn(64, 8)
    budget = 0.5 * max(
        run_pass(fxopt.passes.SwapActivationsLossy(mapping="gelu->relu", budget=10.0), net, (x,)).record.max_rel_err,
        1e-9)
    run = run_pass(fxopt.passes.SwapActivationsLossy(mapping="gelu->relu", budget=budget), net, (x,))
    assert run.record.max_rel_err <= budget
    assert run.count(ops.relu) >= 1
    assert run.record.details[0]["error"] <= budget
