"""The pass contract: what a pass is, what it returns, and what it may ask of the manager.

A pass is a frozen dataclass whose fields are its options::

    @dataclass(frozen=True)
    class RemoveDropout(Pass):
        name: ClassVar[str] = "remove-dropout"
        exact: ClassVar[bool] = True

        def __call__(self, gm, ctx) -> PassResult: ...

It rewrites ``gm`` in place (the manager hands it a working copy and keeps the
original for rollback), never modifies a constant tensor in place (it adds new ones with
``fxopt.ir.add_constant``), and returns a :class:`PassResult` that lists what it matched,
what it changed and every node it left alone with a :class:`fxopt.rewrite.Refusal` (a
stable code and a detail).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.fx as fx

from fxopt.errors import OptionTypeError
from fxopt.evidence import Evidence

if TYPE_CHECKING:
    from fxopt.lossy.task import TaskBudget
    from fxopt.rewrite.refusal import Refusal

# fxopt.rewrite.refusal.UNSPECIFIED, spelled here because fxopt.rewrite imports this module.
_UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class Skip:
    """A node a pass matched but left alone: the refusal's ``code`` and ``detail``.

    A skip given as plain text has the code ``"unspecified"`` and the text as its detail.
    """

    node: str
    code: str
    detail: str = ""

    @property
    def reason(self) -> str:
        """The human-readable reason (the detail, or the code when there is none)."""
        return self.detail or self.code

    @property
    def group(self) -> str:
        """What the report counts this skip under: its code, or, without one, its text."""
        return self.detail if self.code == _UNSPECIFIED else self.code


@dataclass
class PassResult:
    """What one pass did. ``stats`` counts at least ``matched`` and ``applied``."""

    modified: bool = False
    stats: Counter[str] = field(default_factory=Counter)
    skipped: list[Skip] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return self.stats["matched"]

    @property
    def applied(self) -> int:
        return self.stats["applied"]

    def match(self, count: int = 1) -> None:
        self.stats["matched"] += count

    def apply(self, count: int = 1) -> None:
        self.stats["applied"] += count
        self.modified = True

    def skip(self, node: fx.Node | str, reason: Refusal | str) -> None:
        """Record that ``node`` stays as it is, with a :class:`~fxopt.rewrite.Refusal`
        (or, from a pass without refusal codes, a plain text)."""
        name = node.name if isinstance(node, fx.Node) else str(node)
        if isinstance(reason, str):
            self.skipped.append(Skip(name, _UNSPECIFIED, reason))
        else:
            self.skipped.append(Skip(name, reason.code, reason.detail))

    def admit(self, nodes: Iterable[fx.Node], refusal: Callable[[fx.Node], Refusal | None]) -> list[fx.Node]:
        """Count each of ``nodes`` as a match, record the skip of each that ``refusal`` refuses,
        and return the others (in order): a pass's candidates."""
        admitted = []
        for node in nodes:
            self.match()
            reason = refusal(node)
            if reason is not None:
                self.skip(node, reason)
            else:
                admitted.append(node)
        return admitted

    def reasons(self) -> Counter[str]:
        """How many skips per refusal code (a skip without a code counts under its text)."""
        return Counter(s.group for s in self.skipped)


@dataclass(frozen=True)
class PassContext:
    """What a pass is given: read-only configuration and a handle on what was measured.

    ``batches`` are flat input lists: the example inputs first, then calibration batches,
    then ``fresh_batches`` inputs drawn like the examples (other values, another batch
    size), there to verify on and never to calibrate on: an observer reads
    ``batches[:len(batches) - fresh_batches]``. ``task`` (optional): a task-metric budget
    (:class:`fxopt.lossy.task.TaskBudget`: labelled batches, a metric, ``max_drop``) that every
    budgeted search of a lossy pass also keeps, besides the pass's output-error budget.

    ``evidence`` is the compilation's :class:`fxopt.evidence.Evidence`, which the
    session and the pass manager own and fill; a pass reads it (``reference``, ``original``,
    ``values`` below) and never writes it.
    """

    batches: list[list[torch.Tensor]]
    calibrated: bool = False
    fresh_batches: int = 0
    task: TaskBudget | None = None
    evidence: Evidence = field(default_factory=Evidence)

    @property
    def reference(self) -> list[list[Any]]:
        """The current graph's outputs on each batch (empty until the manager computed them),
        so a lossy pass can measure a candidate rewrite with :meth:`output_error`."""
        return self.evidence.reference

    @property
    def original(self) -> list[list[Any]]:
        """The captured graph's outputs on each batch, when known."""
        return self.evidence.original

    @property
    def values(self) -> Any:
        """A :class:`fxopt.verify.ReusingRunner` holding the current graph's node values on the
        batches a pass may observe (keyed by position in ``batches``), kept by the manager
        before a lossy pass: observers (:func:`fxopt.lossy.known_values`), a search's trials
        and the pass's verification reuse them instead of running the graph again; or None."""
        return self.evidence.values

    @property
    def example_inputs(self) -> list[torch.Tensor]:
        return self.batches[0]

    @property
    def observable_batches(self) -> list[list[torch.Tensor]]:
        """The batches a pass may calibrate on (statistics, scales): all but the fresh ones,
        which are there to verify the choice on data it was not fitted to."""
        return self.batches[: len(self.batches) - self.fresh_batches]

    def output_error(self, gm: fx.GraphModule) -> float:
        """Largest relative output error of ``gm`` against the reference, over all batches."""
        from fxopt.verify import compare_outputs, run_graph

        worst = 0.0
        for inputs, expected in zip(self.batches, self.reference):
            comparison = compare_outputs(expected, run_graph(gm, inputs))
            if comparison.mismatch:
                return float("inf")
            worst = max(worst, comparison.max_rel)
        return worst


class Pass:
    """Base class of every pass. Subclasses are ``@dataclass(frozen=True)``.

    Class attributes:
      name: kebab-case name used in ``passes=[...]`` and the CLI.
      exact: True when the rewrite preserves outputs (up to float rounding).
      after: names of the passes this one must run after when both are in a pipeline
        (the default pipeline is a topological order of these constraints).
      before: names of the passes this one must run before (the same constraint, declared
        by the other side: :mod:`fxopt.ordering`).
      prepares: True for a rewrite that pays off only through a later pass (smooth-quant
        moves activation outliers into the weights for quantization): a preset's candidate
        whose applied lossy passes are all of these is dropped, as one that changed nothing.

    A lossy pass declares a ``budget`` field: the largest relative output error it may
    introduce, which the manager enforces.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    prepares: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __post_init__(self) -> None:
        check_option_types(self)

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's module docstring (its one-line description)."""
        import sys

        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        lines = [line.strip() for line in doc.strip().splitlines() if line.strip()]
        return lines[0] if lines else ""

    @property
    def budget_or_none(self) -> float | None:
        return None if self.exact else float(getattr(self, "budget", 0.0))

    def describe(self) -> str:
        options = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) != f.default
        )
        return f"{self.name}({options})" if options else self.name


_SIMPLE_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
    str: (str,),
}


def check_option_types(instance: Any) -> None:
    """Refuse option values of the wrong type, naming the option (simple annotations only)."""
    if not dataclasses.is_dataclass(instance):
        return
    annotations = _option_annotations(type(instance))
    for f in dataclasses.fields(instance):
        if f.name not in annotations:
            continue
        value = getattr(instance, f.name)
        allowed = _allowed_types(annotations[f.name])
        if allowed is None:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = " or ".join(sorted({t.__name__ for t in allowed}))
            raise OptionTypeError(
                f"pass '{instance.name}': option '{f.name}' must be {names}, got {value!r}"
            )


def _option_annotations(pass_type: type) -> dict[str, Any]:
    """The resolved annotation of each option field (annotations are strings under PEP 563).

    A pass defined inside a function may annotate its class attributes with names local to
    that function, which ``get_type_hints`` cannot see; then each option is resolved on its
    own, and one that still cannot be resolved is not checked.
    """
    try:
        return typing.get_type_hints(pass_type)
    except Exception:
        pass
    resolved: dict[str, Any] = {}
    for f in dataclasses.fields(pass_type):
        holder = type("_Option", (), {"__annotations__": {f.name: f.type}, "__module__": pass_type.__module__})
        try:
            resolved.update(typing.get_type_hints(holder))
        except Exception:
            continue
    return resolved


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    if annotation in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        allowed: list[type] = []
        for member in typing.get_args(annotation):
            if member is type(None):
                allowed.append(type(None))
            elif member in _SIMPLE_TYPES:
                allowed.extend(_SIMPLE_TYPES[member])
            else:
                return None
        return tuple(allowed)
    return None


def option_names(pass_type: type) -> Sequence[str]:
    return [f.name for f in dataclasses.fields(pass_type)] if dataclasses.is_dataclass(pass_type) else []
