from __future__ import annotations

import sys
import textwrap

import pytest
import torch
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
    """A pass in a separate installed distribution is found through the entry-point group."""
    package = tmp_path / "fxopt_plugin_demo"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        """Replace relu(relu(x)) with relu(x)."""
        from dataclasses import dataclass
        from typing import ClassVar

        import fxopt
        from fxopt.ir import call_nodes, is_op, ops, replace_node


        @dataclass(frozen=True)
        class DoubleRelu(fxopt.Pass):
            name: ClassVar[str] = "double-relu"

            def __call__(self, gm, ctx):
                result = fxopt.PassResult()
                for node in call_nodes(gm, ops.relu):
                    if is_op(node.args[0], ops.relu):
                        result.match()
                        replace_node(node, node.args[0])
                        result.apply()
                return result
    '''))
    dist = tmp_path / "fxopt_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fxopt-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fxopt.passes]\ndouble-relu = fxopt_plugin_demo:DoubleRelu\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        assert "double-relu" in [p.name for p in fxopt.list_passes()]
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()).eval()
        x = torch.randn(2, 4)
        opt = fxopt.compile(model, (x,), passes=["double-relu"])
        assert opt.report["double-relu"].applied == 1
        assert torch.equal(opt(x), model(x))
    finally:
        registry._registered.pop("double-relu", None)
        sys.modules.pop("fxopt_plugin_demo", None)
        monkeypatch.undo()
        registry.refresh()
