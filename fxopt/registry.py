"""The pass registry: passes are found through the ``fxopt.passes`` entry-point group.

Built-in passes and third-party plugins take the same path; the core names none of them.
Entry points are read lazily, on the first lookup, so importing fxopt does no work beyond
this module's definitions. ``register_pass`` adds a pass class at run time.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from fxopt.errors import PassOptionError, UnknownPassError
from fxopt.pass_api import Pass, option_names

ENTRY_POINT_GROUP = "fxopt.passes"

_registered: dict[str, type[Pass]] = {}
_entry_points: dict[str, Any] | None = None


def register_pass(pass_type: type[Pass]) -> type[Pass]:
    """Register a pass class under its ``name``; usable as a class decorator."""
    if not (isinstance(pass_type, type) and issubclass(pass_type, Pass)):
        raise TypeError(f"register_pass takes a Pass subclass, got {pass_type!r}")
    if not pass_type.name or pass_type.name != pass_type.name.lower() or " " in pass_type.name:
        raise ValueError(f"pass name must be kebab-case, got {pass_type.name!r}")
    _registered[pass_type.name] = pass_type
    return pass_type


def refresh() -> None:
    """Forget what was read from entry points (after installing a plugin at run time)."""
    global _entry_points
    _entry_points = None


def _discovered() -> dict[str, Any]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points


def _names() -> list[str]:
    return sorted(set(_discovered()) | set(_registered))


def get_pass(name: str, **options: Any) -> Pass:
    """A pass instance by name, configured with ``options``."""
    return _instantiate(get_pass_type(name), options)


def get_pass_type(name: str) -> type[Pass]:
    if name in _registered:
        return _registered[name]
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
    _registered.setdefault(name, pass_type)
    return pass_type


def list_passes() -> list[type[Pass]]:
    """Every registered pass class, in default pipeline order."""
    types = [get_pass_type(name) for name in _names()]
    return sorted(types, key=lambda t: (t.default_order, t.name))


def default_pipeline() -> list[Pass]:
    """The pipeline used when ``passes=None``: every registered exact pass, default options."""
    return [_instantiate(t, {}) for t in list_passes() if t.exact]


def _instantiate(pass_type: type[Pass], options: dict[str, Any]) -> Pass:
    valid = option_names(pass_type)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise PassOptionError(
            f"pass '{pass_type.name}' has no option {unknown[0]!r} (options: {', '.join(valid) or 'none'})"
        )
    try:
        return pass_type(**options)
    except PassOptionError:
        raise
    except (TypeError, ValueError) as exc:
        raise PassOptionError(f"pass '{pass_type.name}': {exc}") from exc


def resolve_passes(passes: str | Pass | Iterable[str | Pass] | None) -> list[Pass]:
    """Turn ``passes=`` into pass instances.

    Accepts None (the default pipeline), a pass object, a name, a comma-separated string
    (``"remove-dropout,low-rank(energy=0.99)"``), or a list mixing names and objects.
    """
    if passes is None:
        return default_pipeline()
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    resolved: list[Pass] = []
    for item in passes:
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
