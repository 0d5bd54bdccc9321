"""What a saved file may name, and where each name is looked up.

Code runs on load only from torch, fxopt and the registered plugins (the packages that
declare fxopt entry points: passes, lowerings, backends, presets, techniques). A file names
operators and types; each is looked up here and refused when it is not theirs:

- an operator is ``namespace::name.overload`` from torch's own namespaces, fxopt's
  (``torch.ops.fxopt.*``: every custom op fxopt defines, now or later), or a registered
  plugin's (the namespace named after its package), found among the operators already
  registered with the dispatcher; operators that read or write files (``aten::from_file``,
  ``aten::save``) are refused wherever they come from;
- a Python function is one of the arithmetic and indexing builtins an exported graph calls
  (``operator.getitem``, ``operator.mul``, ``math.ceil``, ``torch.sym_max``, ...);
- a type (the report's, the signature's) is a dataclass defined in fxopt or a plugin.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
import pkgutil
import sys
from importlib.metadata import entry_points
from typing import Any

import torch

from fxopt.errors import FxoptError


class UnsafeFileError(FxoptError):
    """A saved file names something fxopt will not build (an untrusted op, function or type)."""

TORCH_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "quantized", "_quantized", "mkldnn", "onednn"})
PLUGIN_GROUPS = ("fxopt.passes", "fxopt.lowerings", "fxopt.backends", "fxopt.presets", "fxopt.techniques")


def _builtin_functions() -> dict[str, Any]:
    names = {f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")}
    names.update({f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")})
    for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt", "_assert"):
        if hasattr(torch, name):  # guards the ones older torch lacks
            names[f"torch.{name}"] = getattr(torch, name)
    return names


BUILTIN_FUNCTIONS = _builtin_functions()
_BUILTIN_NAMES = {id(function): name for name, function in BUILTIN_FUNCTIONS.items()}


def plugin_packages() -> frozenset[str]:
    """The top-level packages that declare an fxopt entry point (fxopt itself among them)."""
    return _plugin_packages(tuple(sys.path))  # looked up again when sys.path changes


@functools.cache
def _plugin_packages(path: tuple[str, ...]) -> frozenset[str]:
    packages = {"fxopt"}
    for group in PLUGIN_GROUPS:
        for entry in entry_points(group=group):
            packages.add(entry.value.split(":")[0].split(".")[0])
    return frozenset(packages)


def trusted_module(name: str) -> bool:
    """Whether ``name`` is a module of fxopt or of a registered plugin."""
    return isinstance(name, str) and name.split(".")[0] in plugin_packages() and all(
        part.isidentifier() for part in name.split("."))


def register_custom_ops() -> None:
    """Import what defines the operators a stored graph may call: fxopt's kernels (every
    module of :mod:`fxopt.kernels`), the QDQ ops and the registered lowerings."""
    import fxopt.ir.qdq  # noqa: F401 - quantize/dequantize ops a QDQ graph calls
    import fxopt.kernels
    from fxopt.lowering.registry import lowerings

    for module in pkgutil.iter_modules(fxopt.kernels.__path__):
        importlib.import_module(f"fxopt.kernels.{module.name}")
    lowerings()


def target_name(target: Any) -> dict[str, str]:
    """How the file names a ``call_function`` target; refuses what :func:`resolve_target` would."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}::{target._opname}.{target._overloadname}"
        _check_namespace(name, target.namespace)
        _check_schema(name, target)
        return {"op": name}
    builtin = _BUILTIN_NAMES.get(id(target))
    if builtin is not None:
        return {"function": builtin}
    raise FxoptError(f"cannot save a graph that calls {getattr(target, '__module__', '?')}."
                     f"{getattr(target, '__qualname__', target)}: a saved graph calls registered operators "
                     "(torch.ops.*) and a few Python builtins only")


def resolve_target(entry: Any) -> Any:
    """The ``call_function`` target the file names, looked up among trusted code only."""
    if isinstance(entry, dict) and isinstance(entry.get("function"), str):
        function = BUILTIN_FUNCTIONS.get(entry["function"])
        if function is None:
            raise UnsafeFileError(f"the file calls the Python function {entry['function']!r}, which a saved graph "
                                  f"may not call (allowed: {', '.join(sorted(BUILTIN_FUNCTIONS))})")
        return function
    name = entry.get("op") if isinstance(entry, dict) else None
    if not isinstance(name, str) or "::" not in name:
        raise UnsafeFileError(f"malformed call target in the file: {entry!r}")
    namespace, _, rest = name.partition("::")
    op_name, _, overload = rest.partition(".")
    if not all(part.isidentifier() for part in (namespace, op_name, overload or "default")):
        raise UnsafeFileError(f"malformed operator name in the file: {name!r}")
    _check_namespace(name, namespace, UnsafeFileError)
    if not _registered(f"{namespace}::{op_name}"):
        raise UnsafeFileError(f"the file calls the operator {name}, which is not registered in this process "
                              "(a newer fxopt, or a plugin that is not installed?)")
    packet = getattr(getattr(torch.ops, namespace), op_name)
    op = getattr(packet, overload or "default", None)
    if not isinstance(op, torch._ops.OpOverload):
        raise UnsafeFileError(f"the file calls {name}, which is not an operator overload")
    _check_schema(name, op, UnsafeFileError)
    return op


def _registered(qualified: str) -> bool:
    """Whether the dispatcher knows ``ns::op`` (asked without importing anything)."""
    try:
        return bool(torch._C._jit_get_schemas_for_operator(qualified))
    except RuntimeError:
        return False


def _check_namespace(name: str, namespace: str, error: type[Exception] = FxoptError) -> None:
    if namespace in TORCH_NAMESPACES or namespace in plugin_packages():
        return
    raise error(f"the operator {name} is not from torch, fxopt or a registered plugin (its namespace {namespace!r} "
                "is none of theirs): refused")


def _check_schema(name: str, op: Any, error: type[Exception] = FxoptError) -> None:
    if any(argument.name == "filename" for argument in op._schema.arguments):
        raise error(f"the operator {name} reads or writes files: a saved graph may not call it")
