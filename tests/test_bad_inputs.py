"""Bad inputs and misbehaving passes: each gets a clear error or a reasoned skip, and the
user's model is never changed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt import registry
from fxopt.ir import add_constant, call_nodes, constant, ops
from fxopt.pass_api import PassContext, PassResult
from fxopt.verify import module_fingerprint


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def block(d: int = 8) -> nn.Module:
    model = Block(d)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def state_bits(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


@pytest.fixture
def registered():
    """Register passes for one test, and forget them afterwards."""
    with registry.scoped_registry():
        yield registry.register_pass


# ---------------------------------------------------------------- model and inputs

def test_training_mode_warns_optimizes_eval_copy_and_leaves_model_training() -> None:
    model = block().train()
    x = torch.randn(4, 8)
    bits = state_bits(model)
    with pytest.warns(UserWarning, match="training mode"):
        opt = fxopt.compile(model, (x,))
    assert all(m.training for m in model.modules())
    assert state_bits(model) == bits  # BatchNorm statistics not updated by a training-mode forward
    assert any("training mode" in note for note in opt.report.notes)
    reference = block()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(opt(x), reference.eval()(x), rtol=1e-4, atol=1e-5)
    assert opt.report["remove-dropout"].applied == 1  # the eval copy's dropout is the identity


def test_missing_example_inputs() -> None:
    with pytest.raises(fxopt.InputError, match="example_inputs is required"):
        fxopt.compile(block(), None)


def test_example_inputs_of_the_wrong_kind() -> None:
    with pytest.raises(fxopt.InputError, match="tuple of tensors"):
        fxopt.compile(block(), {"inputs": torch.randn(4, 8)})  # a dict must name forward's arguments


def test_example_inputs_of_the_wrong_shape_name_the_module_and_line() -> None:
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.compile(block(), (torch.randn(4, 7),))
    message = str(info.value)
    assert "fc1" in message and "test_bad_inputs.py" in message
    assert "example inputs' shapes" in message  # the hint


def test_example_inputs_of_the_wrong_dtype() -> None:
    # export traces with fake tensors and lets this through; the first real run catches it
    with pytest.raises(fxopt.InputError, match="fails on the example inputs.*same dtype"):
        fxopt.compile(block(), (torch.randn(4, 8, dtype=torch.float64),))


def test_call_with_wrong_shape_or_dtype_after_compile() -> None:
    opt = fxopt.compile(block(), (torch.randn(4, 8),))
    with pytest.raises(fxopt.InputError, match=r"expected shape \(4, 8\).*got shape \(4, 9\)"):
        opt(torch.randn(4, 9))
    with pytest.raises(fxopt.InputError, match="expected dtype torch.float32, got torch.float16"):
        opt(torch.randn(4, 8, dtype=torch.float16))
    # the structure is checked as well as each tensor (a call of plain tensors skips the tree walk)
    with pytest.raises(fxopt.InputError, match=r"expected 1 positional tensor\(s\), got 2 positional"):
        opt(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(fxopt.InputError, match="structure does not match"):
        opt((torch.randn(4, 8),))
    with pytest.raises(fxopt.InputError, match="structure does not match"):
        opt(torch.randn(4, 8), scale=torch.randn(4))
    x = torch.randn(4, 8)
    assert isinstance(opt(x), torch.Tensor)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x)
        return y * scale if scale is not None else y


def test_keyword_arguments() -> None:
    model = TwoInputs().eval()
    x, scale = torch.randn(2, 8), torch.rand(2, 4)
    opt = fxopt.compile(model, (x,), example_kwargs={"scale": scale})
    torch.testing.assert_close(opt(x, scale=scale), model(x, scale=scale))
    with pytest.raises(fxopt.InputError, match=r"keyword\(s\) \['scale'\]"):
        opt(x)


# ---------------------------------------------------------------- pass names and options

def test_unknown_pass_name_suggests_close_matches() -> None:
    with pytest.raises(fxopt.UnknownPassError, match="did you mean 'fold-batchnorm'"):
        fxopt.compile(block(), (torch.randn(4, 8),), passes=["fold-batchnrom"])


def test_invalid_pass_option_names_the_option() -> None:
    with pytest.raises(fxopt.PassOptionError, match="has no option 'bogus'"):
        fxopt.compile(block(), (torch.randn(4, 8),), passes="remove-dropout(bogus=1)")


def test_option_of_the_wrong_type_names_the_option(registered) -> None:
    @dataclass(frozen=True)
    class Scaled(fxopt.Pass):
        name: ClassVar[str] = "test-scaled"
        factor: float = 1.0

        def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            return PassResult()

    registered(Scaled)
    with pytest.raises(fxopt.PassOptionError, match="option 'factor' must be"):
        fxopt.compile(block(), (torch.randn(4, 8),), passes="test-scaled(factor='big')")


# ---------------------------------------------------------------- NaN and Inf

@pytest.mark.parametrize("where", ["bn_var", "bn_mean", "fc1_weight_row", "fc2_weight_col"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inf_weights_do_not_spread(where: str, value: float) -> None:
    model = block()
    with torch.no_grad():
        if where == "bn_var":
            model.bn.running_var[3] = value
        elif where == "bn_mean":
            model.bn.running_mean[5] = value
        elif where == "fc1_weight_row":
            model.fc1.weight[2, :] = value
        else:
            model.fc2.weight[:, 1] = value
    x = torch.randn(6, 8)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.compile(model, (x,))
    actual = opt(x)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN pattern changed"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "Inf pattern changed"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)
    if where == "bn_var" and value == float("inf"):
        # 1/sqrt(inf) = 0: the channel becomes the constant beta, finite either way
        assert opt.report["fold-batchnorm"].applied == 1
    elif where.startswith("bn"):
        assert opt.report["fold-batchnorm"].applied == 0
        assert any("not-finite" in reason for reason in opt.report["fold-batchnorm"].skipped)


def test_nan_in_one_bn_channel_does_not_reach_clean_outputs() -> None:
    """A NaN statistic poisons one feature; folding it into fc2 would mix it into every output."""
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].running_var[0] = float("nan")
        model[1].weight[:, 0] = 0.0  # that feature does not reach the outputs...
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    assert torch.isnan(expected).all()  # ...yet 0 * NaN is NaN in eager too
    opt = fxopt.compile(model, (x,))
    assert torch.isnan(opt(x)).all()
    assert opt.report["fold-batchnorm"].applied == 0


# ---------------------------------------------------------------- capture failures

class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:  # control flow on a tensor value
            return h
        return -h


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_uncapturable_model_names_module_and_line() -> None:
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.compile(Outer().eval(), (torch.randn(2, 4),))
    error = info.value
    assert error.module_path == "inner"
    assert error.source is not None and "test_bad_inputs.py" in error.source and "h.sum() > 0" in error.source
    assert "torch.cond" in str(error)


# ---------------------------------------------------------------- misbehaving passes

@dataclass(frozen=True)
class Raises(fxopt.Pass):
    name: ClassVar[str] = "test-raises"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom")


@dataclass(frozen=True)
class DanglingNode(fxopt.Pass):
    """Points a Linear at a get_attr whose attribute does not exist."""

    name: ClassVar[str] = "test-dangling"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        linear = call_nodes(gm, ops.linear)[0]
        with gm.graph.inserting_before(linear):
            ghost = gm.graph.get_attr("no_such_weight")
        linear.replace_input_with(linear.args[1], ghost)
        result.apply()
        return result


@dataclass(frozen=True)
class ChangesOutputs(fxopt.Pass):
    """Claims to be exact but scales a weight by 2."""

    name: ClassVar[str] = "test-wrong"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        linear = call_nodes(gm, ops.linear)[-1]
        doubled = add_constant(gm, constant(gm, linear.args[1]) * 2, "doubled")
        linear.replace_input_with(linear.args[1], doubled)
        result.apply()
        return result


class _Mutator:
    """A pass that reaches the user's model through a closure and writes to it."""

    model: nn.Module | None = None


@dataclass(frozen=True)
class MutatesUserModel(fxopt.Pass):
    name: ClassVar[str] = "test-mutates"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        assert _Mutator.model is not None
        with torch.no_grad():
            _Mutator.model.fc1.weight.mul_(3)
            _Mutator.model.train()
        return PassResult()


@dataclass(frozen=True)
class ReturnsNothing(fxopt.Pass):
    name: ClassVar[str] = "test-returns-none"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext):  # type: ignore[override]
        return None


BROKEN = {
    "test-raises": (Raises, "raised RuntimeError: boom"),
    "test-dangling": (DanglingNode, "no_such_weight"),
    "test-wrong": (ChangesOutputs, "exact pass changed outputs"),
    "test-mutates": (MutatesUserModel, "modified the user's model"),
    "test-returns-none": (ReturnsNothing, "instead of a PassResult"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_pass_is_rolled_back_and_reported(name: str, registered) -> None:
    pass_type, reason = BROKEN[name]
    registered(pass_type)
    model = block()
    _Mutator.model = model
    x = torch.randn(4, 8)
    fingerprint, bits = module_fingerprint(model), state_bits(model)
    with torch.no_grad():
        expected = model(x)
    # A pass that writes to the model is restored from fxopt's copies of the weights; shared
    # weights cannot be (see test_a_pass_that_writes_shared_weights_stops_the_compile).
    with pytest.warns(UserWarning, match=f"pass '{name}' rolled back"):
        opt = fxopt.compile(model, (x,), passes=["remove-dropout", name, "fold-batchnorm"],
                            share_weights=name != "test-mutates")
    record = opt.report[name]
    assert record.status == "rolled back" and reason in record.message
    assert opt.report["fold-batchnorm"].status == "applied"  # the pipeline went on
    torch.testing.assert_close(opt(x), expected, rtol=1e-4, atol=1e-5)
    assert module_fingerprint(model)[0] == fingerprint[0]  # tree and train/eval flags
    assert state_bits(model) == bits
    assert "rolled back" in str(opt.report)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_pass_under_strict_raises_naming_it(name: str, registered) -> None:
    pass_type, reason = BROKEN[name]
    registered(pass_type)
    model = block()
    _Mutator.model = model
    bits = state_bits(model)
    with pytest.raises(fxopt.PassFailedError) as info:
        fxopt.compile(model, (torch.randn(4, 8),), passes=["remove-dropout", name], strict=True,
                      share_weights=name != "test-mutates")
    assert info.value.pass_name == name
    assert reason in str(info.value) and "remove-dropout" in str(info.value)
    assert state_bits(model) == bits
    assert not model.training


def test_a_pass_that_writes_shared_weights_stops_the_compile(registered) -> None:
    """With the model's weights shared (the default), a write to them reaches the graph's
    constants: nothing is left to restore from, so the compile stops, naming the pass and
    saying the model's weights changed, instead of rolling back."""
    registered(MutatesUserModel)
    model = block()
    _Mutator.model = model
    with pytest.raises(fxopt.PassFailedError, match="model's weights were changed too") as info:
        fxopt.compile(model, (torch.randn(4, 8),), passes=["remove-dropout", "test-mutates"])
    assert info.value.pass_name == "test-mutates"


# ---------------------------------------------------------------- nothing to do

def test_empty_pass_list_runs_and_reports_nothing_to_do() -> None:
    model = block()
    x = torch.randn(4, 8)
    opt = fxopt.compile(model, (x,), passes=[])
    assert opt.report.passes == []
    assert "nothing to do" in str(opt.report)
    torch.testing.assert_close(opt(x), model(x))


def test_model_without_linear_layers_runs_with_nothing_applied() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Dropout(0.0), nn.Tanh()).eval()
    x = torch.randn(3, 5)
    opt = fxopt.compile(model, (x,))
    assert all(r.applied == 0 or r.name == "remove-dropout" for r in opt.report.passes)
    assert all(r.status != "rolled back" for r in opt.report.passes)
    torch.testing.assert_close(opt(x), model(x))


def test_model_without_parameters_or_ops() -> None:
    model = nn.Identity()
    x = torch.randn(2, 3)
    opt = fxopt.compile(model, (x,))
    assert all(r.status == "no change" for r in opt.report.passes)
    torch.testing.assert_close(opt(x), x)
