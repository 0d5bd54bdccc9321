"""fxopt.compile end to end: invariants, training mode, devices, calibration input checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt.demo import build_demo
from fxopt.ir import count_ops, ops
from fxopt.verify import module_fingerprint


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, fingerprint: tuple, state: dict[str, torch.Tensor]) -> None:
    assert module_fingerprint(model) == fingerprint
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} changed"


def test_user_model_is_never_mutated() -> None:
    model, inputs = build_demo(batch=8, d_in=32, hidden=64)
    fingerprint, state = module_fingerprint(model), _state_copy(model)
    opt = fxopt.compile(model, inputs)
    _assert_untouched(model, fingerprint, state)
    assert count_ops(opt.graph_module, ops.batch_norm) == 0
    # the optimized module keeps working after the model is changed afterwards: it owns its weights
    expected = [t.clone() for t in opt(*inputs)]
    with torch.no_grad():
        model.tower[0].weight.zero_()
    assert all(torch.equal(a, b) for a, b in zip(opt(*inputs), expected))


def test_training_mode_model_is_optimized_from_an_eval_copy_with_a_warning() -> None:
    model, inputs = build_demo(batch=8, d_in=32, hidden=64)
    model.train()
    fingerprint, state = module_fingerprint(model), _state_copy(model)
    with pytest.warns(UserWarning, match="training mode"):
        opt = fxopt.compile(model, inputs)
    _assert_untouched(model, fingerprint, state)
    assert model.training and model.tower[1].training
    assert any("eval() copy" in note for note in opt.report.notes)
    eval_copy = copy.deepcopy(model).eval()
    for a, b in zip(opt(*inputs), eval_copy(*inputs)):
        assert torch.allclose(a, b, atol=1e-5)


def test_example_inputs_must_be_given_and_be_tensors() -> None:
    model = nn.Linear(3, 3).eval()
    with pytest.raises(fxopt.InputError, match="example_inputs is required"):
        fxopt.compile(model, None)
    with pytest.raises(fxopt.InputError, match="must be a tuple of tensors"):
        fxopt.compile(model, {"x": torch.randn(2, 3)})
    with pytest.raises(fxopt.InputError, match="must be a torch.nn.Module"):
        fxopt.compile(lambda x: x, (torch.randn(2, 3),))


def test_single_tensor_example_input_and_kwargs() -> None:
    class WithKwarg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * scale

    model = WithKwarg().eval()
    x, scale = torch.randn(2, 4), torch.randn(2, 4)
    opt = fxopt.compile(model, x, example_kwargs={"scale": scale})
    assert torch.allclose(opt(x, scale=scale), model(x, scale=scale))
    with pytest.raises(fxopt.InputError, match="structure"):
        opt(x)


def test_calibration_batches_are_checked() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(fxopt.InputError, match=r"calibration batch 1, input 0 .* got shape \(2, 5\)"):
        fxopt.compile(model, (x,), calibration=[(torch.randn(2, 4),), (torch.randn(2, 5),)])
    with pytest.raises(fxopt.InputError, match="iterable of input tuples"):
        fxopt.compile(model, (x,), calibration=torch.randn(2, 4))


def test_unknown_pass_fails_before_capture() -> None:
    with pytest.raises(fxopt.UnknownPassError, match="remove-dropout"):
        fxopt.compile(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), passes=["remove-dropuot"])


def test_unknown_backend() -> None:
    with pytest.raises(fxopt.BackendError, match="unknown backend 'tvm'"):
        fxopt.compile(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), backend="tvm")


def test_cuda_requested_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(fxopt.BackendError, match="CUDA is not available"):
        fxopt.compile(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), device="cuda")


@pytest.mark.cuda
def test_cuda_eager_backend() -> None:
    model, inputs = build_demo(batch=8, d_in=32, hidden=64)
    opt = fxopt.compile(model, inputs, device="cuda")
    outputs = opt(*(t.cuda() for t in inputs))
    for a, b in zip(outputs, model(*inputs)):
        assert a.device.type == "cuda"
        assert torch.allclose(a.cpu(), b, atol=1e-4)
    with pytest.raises(fxopt.InputError, match="is on cpu"):
        opt(*inputs)
