from __future__ import annotations

import sys

import pytest
import torch
from conftest import PLUGIN_DIR, plugin_metadata
from torch import nn

import fxopt
from fxopt import registry


def test_builtin_passes_are_registered_by_entry_point() -> None:
    names = [p.name for p in fxopt.list_passes()]
    assert {"remove-dropout", "fold-batchnorm"} <= set(names)
    assert fxopt.passes.FoldBatchNorm is registry.get_pass_type("fold-batchnorm")


def test_unknown_pass_suggests_close_matches() -> None:
    with pytest.raises(fxopt.UnknownPassError, match="did you mean 'fold-batchnorm'"):
        fxopt.get_pass("fold-batchnrom")


def test_invalid_options_name_the_option() -> None:
    with pytest.raises(fxopt.PassOptionError, match="no option 'colour'"):
        registry.resolve_passes("remove-dropout(colour=1)")


def test_option_type_is_checked() -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Typed(fxopt.Pass):
        name: ClassVar[str] = "test-typed"
        budget: float = 0.1

    with pytest.raises(fxopt.PassOptionError, match="option 'budget' must be float or int"):
        Typed(budget="big")  # type: ignore[arg-type]


def test_comma_separated_specs_with_options() -> None:
    assert registry.split_pass_list("a,b(x=1,y='z'),c") == ["a", "b(x=1,y='z')", "c"]
    assert registry.parse_pass_spec("low-rank(energy=0.99, multiple=8)") == ("low-rank", {"energy": 0.99, "multiple": 8})
    passes = registry.resolve_passes("remove-dropout, fold-batchnorm")
    assert [p.name for p in passes] == ["remove-dropout", "fold-batchnorm"]


def test_default_pipeline_is_every_exact_pass_in_order() -> None:
    pipeline = registry.resolve_passes(None)
    assert all(p.exact for p in pipeline)
    orders = [p.default_order for p in pipeline]
    assert orders == sorted(orders)
    assert pipeline[0].name == "remove-dropout"


def test_plugin_pass_from_another_package_via_entry_point(tmp_path, monkeypatch) -> None:
    """The example plugin (a separate distribution) is found through its entry point."""
    monkeypatch.syspath_prepend(str(plugin_metadata(tmp_path)))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    registry.refresh()
    try:
        assert "double-relu" in [p.name for p in fxopt.list_passes()]
        assert "double-relu" in [p.name for p in registry.default_pipeline()]  # exact: joins the default
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()).eval()
        x = torch.randn(2, 4)
        opt = fxopt.compile(model, (x,), passes=["double-relu"])
        assert opt.report["double-relu"].applied == 1
        assert torch.equal(opt(x), model(x))
    finally:
        registry._registered.pop("double-relu", None)
        sys.modules.pop("fxopt_double_relu", None)
        monkeypatch.undo()
        registry.refresh()
