"""The pass registry: passes are found through the ``fxopt.passes`` entry-point group.

Built-in passes and third-party plugins take the same path; the core names none of them.
Entry points are read lazily, on the first lookup, so importing fxopt does no work beyond
this module's definitions. ``register_pass`` adds a pass class at run time, and
``scoped_registry`` does so for the length of a ``with`` block (a test, say), the way every
registry does (:mod:`fxopt.registrations`).

Order: a pass declares the passes it must run after (``after = ("fold-batchnorm",)``) or
before (``before = (...)``), the one scheme of every registry (:mod:`fxopt.ordering`). The
default pipeline is a topological order of every registered pass, ties broken by name, so
"must run after" is transitive through passes that are not in a given pipeline.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any

from fxopt import ordering
from fxopt.errors import (
    OptionTypeError,
    OptionValueError,
    PassOptionError,
    UnknownOptionError,
    UnknownPassError,
)
from fxopt.pass_api import Pass, option_names
from fxopt.registrations import Entries, Registrations

ENTRY_POINT_GROUP = "fxopt.passes"


# The passes' ``after``/``before`` declarations form a cycle (every registry's ordering error).
PassOrderError = ordering.OrderError


class PassOrderWarning(UserWarning):
    """An explicit pass list runs a pass before one it declares it must run after."""


_REGISTRATIONS: Registrations[type[Pass]] = Registrations("passes")


def _state() -> Entries[type[Pass]]:
    return _REGISTRATIONS.current()


def register_pass(pass_type: type[Pass]) -> type[Pass]:
    """Register a pass class under its ``name``; usable as a class decorator."""
    _state().registered[_checked(pass_type).name] = pass_type
    return pass_type


def _checked(pass_type: type[Pass]) -> type[Pass]:
    if not (isinstance(pass_type, type) and issubclass(pass_type, Pass)):
        raise TypeError(f"register_pass takes a Pass subclass, got {pass_type!r}")
    if not pass_type.name or pass_type.name != pass_type.name.lower() or " " in pass_type.name:
        raise ValueError(f"pass name must be kebab-case, got {pass_type.name!r}")
    return pass_type


@contextmanager
def scoped_registry(*pass_types: type[Pass]) -> Iterator[None]:
    """Register ``pass_types`` (and anything registered inside the block) only until the
    block ends; entry points read inside it are forgotten too. For tests::

        with scoped_registry(MyPass):
            fxopt.compile(model, inputs, passes=["my-pass"])
    """
    with _REGISTRATIONS.registered({_checked(t).name: t for t in pass_types}):
        yield


def refresh() -> None:
    """Forget what was read from entry points (after installing a plugin at run time)."""
    _state().discovered = None


def _discovered() -> dict[str, Any]:
    state = _state()
    if state.discovered is None:
        state.discovered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return state.discovered


def _names() -> list[str]:
    return sorted(set(_discovered()) | set(_state().registered))


def get_pass(name: str, **options: Any) -> Pass:
    """A pass instance by name, configured with ``options``."""
    return _instantiate(get_pass_type(name), options)


def get_pass_type(name: str) -> type[Pass]:
    registered = _state().registered
    if name in registered:
        return registered[name]
    found = _discovered().get(name)
    if found is None:
        close = difflib.get_close_matches(name, _names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownPassError(
            f"unknown pass {name!r}{hint} (available: {', '.join(_names()) or 'none'})"
        )
    pass_type = found.load()
    if not (isinstance(pass_type, type) and issubclass(pass_type, Pass)):
        raise TypeError(f"entry point {name!r} ({found.value}) is not a fxopt Pass subclass")
    if pass_type.name != name:
        raise ValueError(f"entry point {name!r} loads a pass named {pass_type.name!r}")
    registered.setdefault(name, pass_type)
    return pass_type


def list_passes() -> list[type[Pass]]:
    """Every registered pass class, in default pipeline order."""
    return topological_order([get_pass_type(name) for name in _names()])


def default_pipeline() -> list[Pass]:
    """The pipeline used when ``passes=None``: every registered exact pass, default options,
    in an order that satisfies every registered pass's ``after``."""
    return [_instantiate(t, {}) for t in list_passes() if t.exact]


def topological_order(pass_types: Iterable[type[Pass]]) -> list[type[Pass]]:
    """``pass_types`` ordered so each runs after the passes its ``after`` names and before
    those its ``before`` names (those that are among them); among passes free to run, the
    name decides, so the order is stable (:func:`fxopt.ordering.topological_order`, the
    order of lowerings and tune techniques too).

    Raises :class:`PassOrderError` naming the passes of a cycle.
    """
    return ordering.topological_order(pass_types, "passes")


def order_violations(passes: Sequence[Pass]) -> list[str]:
    """The ``after``/``before`` constraints an explicit pipeline breaks, one sentence each.

    "Must run after" is transitive through every registered pass (as in the default
    pipeline), and a pass listed twice satisfies a constraint if any run of it follows a
    run of the pass it must follow. Order is the user's call: this only reports.
    """
    known = _known_types()
    for pass_ in passes:
        known.setdefault(pass_.name, type(pass_))
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for position, pass_ in enumerate(passes):
        first.setdefault(pass_.name, position)
        last[pass_.name] = position
    problems = []
    for name in sorted(last, key=last.__getitem__):
        for predecessor in sorted(_must_follow(name, known)):
            if predecessor in first and last[name] < first[predecessor]:
                problems.append(f"'{name}' runs before '{predecessor}', but is declared to run after it")
    return problems


def _known_types() -> dict[str, type[Pass]]:
    known = dict(_state().registered)
    for name in _discovered():
        if name not in known:
            try:
                known[name] = get_pass_type(name)
            except Exception:  # a broken plugin fails when asked for, not in others' pipelines
                continue
    return known


def _must_follow(name: str, known: dict[str, type[Pass]]) -> set[str]:
    """Every pass ``name`` must run after, directly or through other passes' ``after`` and
    ``before``."""
    waiting_on = ordering.predecessors(known.values())
    seen: set[str] = set()
    stack = [name]
    while stack:
        for predecessor in waiting_on.get(stack.pop(), ()):
            if predecessor not in seen and predecessor != name:
                seen.add(predecessor)
                stack.append(predecessor)
    return seen


def _instantiate(pass_type: type[Pass], options: dict[str, Any]) -> Pass:
    valid = option_names(pass_type)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise UnknownOptionError(
            f"pass '{pass_type.name}' has no option {unknown[0]!r} (options: {', '.join(valid) or 'none'})"
        )
    try:
        return pass_type(**options)
    except PassOptionError:
        raise
    except ValueError as exc:
        raise OptionValueError(f"pass '{pass_type.name}': {exc}") from exc
    except TypeError as exc:
        raise OptionTypeError(f"pass '{pass_type.name}': {exc}") from exc


# In a pass list: every registered exact pass in declared order, less those the list names
# elsewhere (they run there instead: merge-siblings after quantize-int8) or leaves out (a
# preset candidate's ``without``).
EXACT = "exact"


def expand_exact(passes: Sequence[Any], without: Sequence[str] = ()) -> list[Any]:
    """``passes`` with ``"exact"`` replaced by the exact passes in order, less those named
    elsewhere in the list (they run there) and those in ``without``."""
    if EXACT not in passes:
        return list(passes)
    named = (spec.name if hasattr(spec, "name") else parse_pass_spec(spec)[0]
             for spec in passes if isinstance(spec, (str, Pass)) and spec != EXACT)
    left_out = {*without, *named}
    expanded: list[Any] = []
    for spec in passes:
        expanded.extend([p for p in default_pipeline() if p.name not in left_out] if spec == EXACT else [spec])
    return expanded


def resolve_passes(passes: str | Pass | Iterable[str | Pass] | None) -> list[Pass]:
    """Turn ``passes=`` into pass instances.

    Accepts None (the default pipeline), a pass object, a name, a comma-separated string
    (``"remove-dropout,low-rank(energy=0.99)"``), or a list mixing names and objects;
    ``"exact"`` in a list stands for every exact pass not named elsewhere in it.
    """
    if passes is None:
        return default_pipeline()
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    resolved: list[Pass] = []
    for item in expand_exact(list(passes)):
        if isinstance(item, Pass):
            resolved.append(item)
        elif isinstance(item, str):
            for text in split_pass_list(item):
                name, options = parse_pass_spec(text)
                resolved.append(_instantiate(get_pass_type(name), options))
        elif isinstance(item, type) and issubclass(item, Pass):
            resolved.append(_instantiate(item, {}))
        else:
            raise TypeError(f"passes must be names or Pass objects, got {type(item).__name__}")
    return resolved


def split_pass_list(text: str) -> list[str]:
    """Split ``a,b(x=1,y=2),c`` on the commas outside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_pass_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``low-rank(energy=0.99, multiple=8)`` -> ``("low-rank", {"energy": 0.99, "multiple": 8})``."""
    text = text.strip()
    if "(" not in text:
        return text, {}
    if not text.endswith(")"):
        raise PassOptionError(f"cannot parse pass spec {text!r}: expected name(option=value, ...)")
    name, body = text[:-1].split("(", 1)
    options: dict[str, Any] = {}
    for item in split_pass_list(body):
        if "=" not in item:
            raise PassOptionError(f"cannot parse option {item!r} of pass {name.strip()!r}: expected option=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return name.strip(), options
