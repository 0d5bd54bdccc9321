from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

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
    position = {p.name: i for i, p in enumerate(pipeline)}
    for p in pipeline:
        assert all(position[a] < position[p.name] for a in p.after if a in position)
    assert pipeline[0].name == "remove-dropout"
    # The after= declarations reproduce the order the built-in passes always ran in.
    assert [p.name for p in pipeline] == ["remove-dropout", "fold-batchnorm", "swap-activations",
                                          "merge-consecutive", "merge-siblings"]
    assert [t.name for t in fxopt.list_passes()] == [
        "remove-dropout", "fold-batchnorm", "swap-activations", "swap-activations-lossy",
        "merge-consecutive", "low-rank", "merge-siblings", "prune-hidden", "cast-bf16", "cast-fp16",
        "smooth-quant", "quantize-int8", "quantize-attention", "quantize-residual", "quantize-embeddings",
        "quantize-weights"]
    # merge-siblings may run before the lossy passes (float weights) or after quantize-int8
    # (int8 weights): neither order is declared against
    for order in (["merge-siblings", "quantize-int8"], ["quantize-int8", "merge-siblings"]):
        assert registry.order_violations(registry.resolve_passes(order)) == []


def test_plugin_pass_from_another_package_via_entry_point(tmp_path, monkeypatch) -> None:
    """The example plugin (a separate distribution) is found through its entry point."""
    monkeypatch.syspath_prepend(str(plugin_metadata(tmp_path)))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    try:
        with registry.scoped_registry():
            registry.refresh()
            assert "double-relu" in [p.name for p in fxopt.list_passes()]
            default = [p.name for p in registry.default_pipeline()]
            assert "double-relu" in default  # exact: joins the default
            assert default.index("fold-batchnorm") < default.index("double-relu")  # its after=
            model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()).eval()
            x = torch.randn(2, 4)
            opt = fxopt.compile(model, (x,), passes=["double-relu"])
            assert opt.report["double-relu"].applied == 1
            assert torch.equal(opt(x), model(x))
        assert "double-relu" not in [p.name for p in fxopt.list_passes()]
    finally:
        sys.modules.pop("fxopt_double_relu", None)
        monkeypatch.undo()


def _pass(name: str, after: tuple[str, ...] = (), exact: bool = True,
          before: tuple[str, ...] = ()) -> type[fxopt.Pass]:
    """A do-nothing pass class called ``name`` that declares ``after`` and ``before``."""
    return dataclass(frozen=True)(type(name.title().replace("-", ""), (fxopt.Pass,), {
        "name": name, "exact": exact, "after": after, "before": before,
        "__call__": lambda self, gm, ctx: fxopt.PassResult(),
    }))


def test_scoped_registry_registers_for_the_block_only() -> None:
    temporary = _pass("test-temporary")
    with registry.scoped_registry(temporary):
        assert registry.get_pass_type("test-temporary") is temporary
        registry.register_pass(_pass("test-inside"))  # registered inside: also forgotten
        assert "test-inside" in [t.name for t in fxopt.list_passes()]
    names = [t.name for t in fxopt.list_passes()]
    assert "test-temporary" not in names and "test-inside" not in names
    assert "remove-dropout" in names
    with pytest.raises(fxopt.UnknownPassError):
        registry.get_pass_type("test-temporary")


def test_topological_order_follows_after_and_breaks_ties_by_name() -> None:
    a, b, c, d = _pass("a"), _pass("b", after=("c",)), _pass("c"), _pass("d", after=("a", "missing"))
    assert [t.name for t in registry.topological_order([d, c, b, a])] == ["a", "c", "b", "d"]


def test_after_is_transitive_through_passes_not_in_the_pipeline() -> None:
    # Named so that the name tie-break alone would run "t-a-last" first.
    first = _pass("t-z-first")
    middle = _pass("t-middle", after=("t-z-first",), exact=False)
    last = _pass("t-a-last", after=("t-middle",))
    with registry.scoped_registry(first, middle, last):
        names = [p.name for p in registry.default_pipeline()]
        assert "t-middle" not in names  # lossy: not in the default pipeline
        assert names.index("t-z-first") < names.index("t-a-last")
        assert registry.order_violations([last(), first()]) == [
            "'t-a-last' runs before 't-z-first', but is declared to run after it"]
        assert registry.order_violations([first(), last()]) == []
        # a pass listed twice satisfies its constraint if some run of it follows
        assert registry.order_violations([last(), first(), last()]) == []


def test_cycle_in_after_is_a_clear_error() -> None:
    x, y, z = _pass("cyc-x", after=("cyc-z",)), _pass("cyc-y", after=("cyc-x",)), _pass("cyc-z", after=("cyc-y",))
    free = _pass("cyc-free")
    with pytest.raises(registry.PassOrderError, match=r"form a cycle: cyc-x -> cyc-z -> cyc-y -> cyc-x"):
        registry.topological_order([x, y, z, free])
    with registry.scoped_registry(x, y, z), pytest.raises(registry.PassOrderError, match="cycle"):
        registry.default_pipeline()


def test_explicit_order_against_after_warns_and_runs_as_given() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.BatchNorm1d(4)).eval()
    x = torch.randn(3, 4)
    with pytest.warns(registry.PassOrderWarning,
                      match="'fold-batchnorm' runs before 'remove-dropout', but is declared to run after it"):
        opt = fxopt.compile(model, (x,), passes=["fold-batchnorm", "remove-dropout"])
    assert [r.name for r in opt.report.passes] == ["fold-batchnorm", "remove-dropout"]
    assert torch.allclose(opt(x), model(x), atol=1e-5)


def test_option_errors_say_which_kind() -> None:
    from fxopt.errors import OptionTypeError, OptionValueError, UnknownOptionError

    with pytest.raises(UnknownOptionError, match="no option 'colour'"):
        registry.resolve_passes("remove-dropout(colour=1)")

    @dataclass(frozen=True)
    class Bounded(fxopt.Pass):
        name: ClassVar[str] = "test-bounded"
        budget: float | None = None
        ratio: float = 0.5

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 < self.ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")

    with pytest.raises(OptionTypeError, match="option 'budget' must be NoneType or float or int"):
        Bounded(budget="big")  # type: ignore[arg-type]
    assert Bounded(budget=None).budget is None and Bounded(budget=1).budget == 1
    with registry.scoped_registry(Bounded):
        with pytest.raises(OptionValueError, match=r"ratio must be in \(0, 1\], got 2"):
            registry.resolve_passes("test-bounded(ratio=2.0)")
        with pytest.raises(fxopt.PassOptionError):  # the base still catches every kind
            registry.resolve_passes("test-bounded(ratio='x')")


def test_option_types_resolve_without_eval_for_local_annotations() -> None:
    """Annotations are strings here (PEP 563); a name only local to the test still resolves
    per option, and an unresolvable one is left unchecked rather than failing."""
    Local = int  # a type alias only this function can see

    @dataclass(frozen=True)
    class Typed(fxopt.Pass):
        name: ClassVar[str] = "test-local-types"
        count: int = 1
        other: Local = 2

    with pytest.raises(fxopt.PassOptionError, match="option 'count' must be int"):
        Typed(count=1.5)  # type: ignore[arg-type]
    assert Typed(other="unchecked").other == "unchecked"  # type: ignore[arg-type]


def _registries() -> list[tuple[str, Any, Any, Any]]:
    """Each registry: (name, a value to register, the scoped registration, its lookup)."""
    from fxopt import backends, lowering, presets
    from fxopt.lowering import Lowering
    from fxopt.tune import techniques

    class Plain(Lowering):
        name = "test-scoped-lowering"

    return [
        ("passes", _pass("test-scoped-pass"), registry.scoped_registry,
         lambda: {t.name: t for t in registry.list_passes()}),
        ("lowerings", Plain(), lowering.registered_lowering, lambda: {x.name: x for x in lowering.lowerings()}),
        ("backends", backends.Backend("test-scoped-backend", lambda *a: None), backends.registered_backend,
         backends.registered_backends),
        ("presets", presets.Preset("test-scoped-preset", "", ()), presets.registered_preset,
         lambda: {p.name: p for p in presets.list_presets()}),
        ("techniques", techniques.Technique("test-scoped-technique", "t", lambda gm, s: {}, lambda *a: None),
         techniques.registered_technique, lambda: {t.name: t for t in techniques.list_techniques()}),
    ]


@pytest.mark.parametrize("which", ["passes", "lowerings", "backends", "presets", "techniques"])
def test_every_registry_registers_for_a_block_the_same_way(which: str) -> None:
    import threading

    from fxopt.registrations import Registrations

    _, value, registered, lookup = next(r for r in _registries() if r[0] == which)
    module = sys.modules[registered.__module__]
    assert isinstance(module._REGISTRATIONS, Registrations)  # the one mechanism behind each
    before = lookup()
    assert value.name not in before
    with registered(value):
        assert lookup()[value.name] is value
        seen_elsewhere: list[bool] = []
        thread = threading.Thread(target=lambda: seen_elsewhere.append(value.name in lookup()))
        thread.start()
        thread.join()
        assert seen_elsewhere == [False]  # a thread that never entered the block
        with registered(value):  # nested: the outer registration survives the inner block
            assert value.name in lookup()
        assert lookup()[value.name] is value
    assert value.name not in lookup() and set(lookup()) == set(before)


def test_a_scoped_entry_replaces_an_entry_point_of_the_same_name_for_the_block() -> None:
    from fxopt import lowering

    builtin = lowering.get_lowering("int8-linear")
    replacement = type("Replacement", (lowering.Lowering,), {"name": "int8-linear"})()
    with lowering.registered_lowering(replacement):
        assert lowering.get_lowering("int8-linear") is replacement
    assert lowering.get_lowering("int8-linear") is builtin


def test_one_topological_order_for_passes_lowerings_and_techniques(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxopt import lowering, ordering
    from fxopt.tune import techniques

    # before= is the same constraint as after=, declared by the other side
    a, b = _pass("b-first", before=("a-second",)), _pass("a-second")
    assert [t.name for t in registry.topological_order([a, b])] == ["b-first", "a-second"]
    with registry.scoped_registry(a, b):
        assert registry.order_violations([b(), a()]) == [
            "'a-second' runs before 'b-first', but is declared to run after it"]
    # every registry sorts with the one function
    calls: list[str] = []
    sort = ordering.topological_order

    def recording(items, what="passes"):  # type: ignore[no-untyped-def]
        calls.append(what)
        return sort(items, what)

    monkeypatch.setattr(ordering, "topological_order", recording)
    registry.list_passes()
    lowering.lowerings()
    techniques.list_techniques()
    assert calls == ["passes", "lowerings", "techniques"]


def test_exact_in_a_pass_list_stands_for_the_exact_passes_not_named_elsewhere() -> None:
    exact = [p.name for p in registry.default_pipeline()]
    resolved = [p.name for p in registry.resolve_passes(["exact", "quantize-int8"])]
    assert resolved == [*exact, "quantize-int8"]
    # a pass named elsewhere runs there, with its options, and not twice
    resolved = registry.resolve_passes(["merge-siblings", "exact", "low-rank(energy=0.9)"])
    names = [p.name for p in resolved]
    assert names == ["merge-siblings", *[n for n in exact if n != "merge-siblings"], "low-rank"]
    assert resolved[-1].energy == 0.9
    assert [p.name for p in registry.resolve_passes("exact")] == exact
