"""Regression tests for failures found by the fuzz, bad-input and scale runs, each on the
smallest model that showed it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from strategies import Block, ModelSpec, Snapshot, build
from test_fuzz import check_default_pipeline, check_exact_passes
from torch import nn

import fxopt
import fxopt.session


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_compile_keeps_no_second_copy_of_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.export keeps the last exported graph's nodes in a module-level map until the
    next export; fxopt's frozen weights lived on that graph's module and stayed alive after
    compile returned (a second copy of every weight)."""
    frozen: list[weakref.ref] = []
    capture = fxopt.session.capture

    def recording_capture(*args, **kwargs):
        gm = capture(*args, **kwargs)
        frozen.extend(weakref.ref(t) for t in gm._buffers.values())
        return gm

    monkeypatch.setattr(fxopt.session, "capture", recording_capture)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    opt = fxopt.compile(model, (torch.randn(4, 8),), passes=["fold-batchnorm"])
    gc.collect()
    kept = {id(t) for t in opt.graph_module._buffers.values()}
    leaked = [r() for r in frozen if r() is not None and id(r()) not in kept]
    assert not leaked, f"{len(leaked)} frozen tensors outlive fxopt.compile"


def test_restored_model_does_not_trip_the_final_invariant_check() -> None:
    """Restoring a model a pass wrote to bumps tensor versions; compile then raised an
    internal error although the model held its original values."""
    from dataclasses import dataclass
    from typing import ClassVar

    from fxopt import registry
    from fxopt.pass_api import PassResult

    model = nn.Sequential(nn.Linear(4, 4)).eval()
    snapshot = Snapshot.of(model)

    @dataclass(frozen=True)
    class Scribbles(fxopt.Pass):
        name: ClassVar[str] = "test-scribbles"

        def __call__(self, gm, ctx):
            with torch.no_grad():
                model[0].bias.add_(1)
            return PassResult()

    with registry.scoped_registry(Scribbles), pytest.warns(UserWarning, match="modified the user's model"):
        opt = fxopt.compile(model, (torch.randn(2, 4),), passes=["test-scribbles"], share_weights=False)
    assert opt.report["test-scribbles"].status == "rolled back"
    snapshot.assert_same(model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batchnorm_folds_both_ways_in_low_precision(dtype: str) -> None:
    """fold-batchnorm computes folded weights in fp32 (not a float64 copy of each matrix);
    BatchNorm before and after Linears, width 1 included, must stay within tolerance."""
    spec = ModelSpec(d_in=17, lead=(5,), dtype=dtype, seed=3, blocks=(
        Block("batchnorm"), Block("linear", (1,), (True,)), Block("batchnorm"),
        Block("chain", (32, 16), (False, True)), Block("batchnorm"),
        Block("fanout", (8, 8), (True, False), "sum"),
    ))
    check_exact_passes(spec)
    check_default_pipeline(spec)


def test_shape_examples_with_extra_leading_dims() -> None:
    spec = ModelSpec(d_in=3, lead=(2, 1, 3), seed=7, blocks=(
        Block("view"), Block("linear", (1,), (False,)), Block("residual", bias=(True,)),
        Block("fanout", (2, 5), (True, True), "outputs"), Block("dropout"),
    ))
    model, _ = build(spec)
    check_exact_passes(spec)
    check_default_pipeline(spec)


CANCELLING = ModelSpec(d_in=1, lead=(1,), seed=0, bn_affine=False, blocks=(
    Block("linear", (4,), (False,)), Block("linear", (8,), (False,)), Block("batchnorm"),
    Block("batchnorm"), Block("linear", (1,), (False,)),
))


def test_fold_under_cancellation_is_judged_against_float64() -> None:
    """Found by the fuzz campaign: the model's single output (-6e-4) is a sum of terms of
    size ~0.1 that cancel, so fp32 reassociation by folding moves it by 1.2e-4 of its own
    magnitude, over the fp32 tolerance. A float64 evaluation of the previous graph shows the
    fold is as accurate as the original: the fold is kept, and the report says why."""
    from fxopt.testing import run_pass

    model, inputs = build(CANCELLING)
    run = run_pass("fold-batchnorm", model, inputs)
    assert run.record.status == "applied"
    assert run.record.max_rel_err > 1e-4  # over the plain fp32 tolerance ...
    assert "only by rounding" in run.record.message  # ... and explained


def test_fold_under_cancellation_counts_as_exact() -> None:
    check_exact_passes(CANCELLING)


def test_float64_arbitration_still_refuses_a_wrong_rewrite() -> None:
    """A rewrite that changes the function by a little more than the tolerance is not
    excused as rounding."""
    from dataclasses import dataclass
    from typing import ClassVar

    from fxopt.ir import add_constant, call_nodes, constant, ops

    @dataclass(frozen=True)
    class Nudge(fxopt.Pass):
        name: ClassVar[str] = "test-nudge"

        def __call__(self, gm, ctx):
            result = fxopt.PassResult()
            linear = call_nodes(gm, ops.linear)[0]
            linear.update_arg(1, add_constant(gm, constant(gm, linear.args[1]) * (1 + 3e-4), "nudged"))
            result.apply()
            return result

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(fxopt.PassFailedError, match="exact pass changed outputs"):
        fxopt.compile(model, (torch.randn(4, 8),), passes=[Nudge()], strict=True)
