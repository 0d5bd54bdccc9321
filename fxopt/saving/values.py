"""Python values as JSON, and back, for the data a saved module holds besides its graph.

:func:`encode` writes plain JSON for what JSON has (None, bools, ints, finite floats,
strings, lists, string-keyed dicts) and a one-key tagged object for the rest: tuples,
non-finite floats, dtypes, devices, pytree specs, ``bytes`` and tensors (stored elsewhere in
the file, named here), and dataclass instances from trusted code. :func:`decode` builds
only those: a dataclass is looked up by module and name among the modules of fxopt and its
registered plugins (:func:`fxopt.saving.trust.trusted_module`) and built from its fields,
never by calling anything the file names. Anything else is refused with an error naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import pathlib
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxopt.errors import FxoptError
from fxopt.saving.trust import UnsafeFileError, trusted_module

_TORCH_ENUMS = (torch.layout, torch.memory_format)
_BUILTIN_TYPES = {t.__name__: t for t in (int, float, bool, complex, str)}


class Sink:
    """Where :func:`encode` puts what JSON cannot hold: tensors and raw bytes, by name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.blobs: dict[str, bytes] = {}

    def tensor(self, value: torch.Tensor) -> str:
        key = f"value.{len(self.tensors)}"
        self.tensors[key] = value
        return key

    def blob(self, data: bytes, hint: str = "") -> str:
        """The member name for ``data``: numbered, with ``hint`` (a file name) when it is a
        plain one, so ``unzip -l`` shows what each member is (``blobs/0-model.onnx``)."""
        plain = hint.replace(".", "").replace("_", "").replace("-", "").isalnum()
        key = f"blobs/{len(self.blobs)}" + (f"-{hint}" if plain and len(hint) < 100 else "")
        self.blobs[key] = data
        return key


def encode(value: Any, sink: Sink | None = None, *, node: Callable[[Any], Any] | None = None,
           where: str = "value") -> Any:
    """``value`` as JSON-able data (see the module docstring); ``node`` encodes fx nodes."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # a numpy scalar (a pass's detail, say) is stored as the number it is
        if isinstance(value, (bool, int)):
            return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if node is not None and isinstance(value, torch.fx.Node):
        return node(value)
    if isinstance(value, Counter):
        return {"__counter__": [[encode(k, sink, node=node, where=where), n] for k, n in value.items()]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: {"__bytes__": sink.blob(bytes(v), k)} if sink is not None and isinstance(v, (bytes, bytearray))
                    else encode(v, sink, node=node, where=f"{where}[{k!r}]") for k, v in value.items()}
        return {"__dict__": [[encode(k, sink, node=node, where=where), encode(v, sink, node=node, where=where)]
                             for k, v in value.items()]}
    if isinstance(value, list):
        return [encode(v, sink, node=node, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"__tuple__": [encode(v, sink, node=node, where=f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, _TORCH_ENUMS):
        return {"__torch__": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"__slice__": [encode(value.start, sink), encode(value.stop, sink), encode(value.step, sink)]}
    if value is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(value, type) and _BUILTIN_TYPES.get(value.__name__) is value:
        return {"__type__": value.__name__}
    if isinstance(value, pathlib.PurePath):
        return {"__path__": str(value)}
    if isinstance(value, pytree.TreeSpec):
        return {"__treespec__": pytree.treespec_dumps(value)}
    if sink is not None and isinstance(value, (bytes, bytearray)):
        return {"__bytes__": sink.blob(bytes(value))}
    if sink is not None and isinstance(value, torch.Tensor):
        return {"__tensor__": sink.tensor(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not trusted_module(cls.__module__):
            raise FxoptError(f"cannot save {where}: {cls.__module__}.{cls.__qualname__} is not a type of fxopt "
                             "or of a registered plugin")
        fields = {f.name: encode(getattr(value, f.name), sink, node=node, where=f"{where}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise FxoptError(f"cannot save {where}: a {type(value).__module__}.{type(value).__qualname__} has no "
                     "data-only form in an fxopt file")


Loader = Callable[[str], Any]


def decode(data: Any, *, tensor: Loader | None = None, blob: Loader | None = None,
           node: Callable[[str], Any] | None = None, dataclasses_allowed: bool = True) -> Any:
    """The value :func:`encode` wrote; ``tensor``/``blob`` fetch what it stored by name,
    ``node`` resolves a node reference."""
    def again(item: Any) -> Any:
        return decode(item, tensor=tensor, blob=blob, node=node, dataclasses_allowed=dataclasses_allowed)

    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [again(v) for v in data]
    if not isinstance(data, dict):
        raise UnsafeFileError(f"unexpected {type(data).__name__} in the file")
    tags = [k for k in data if k.startswith("__")]
    if not tags:
        return {k: again(v) for k, v in data.items()}
    tag, body = tags[0], data[tags[0]]
    if tag == "__tuple__":
        return tuple(again(v) for v in _list(body, tag))
    if tag == "__dict__":
        return {_hashable(again(k)): again(v) for k, v in _pairs(body, tag)}
    if tag == "__counter__":
        return Counter({_hashable(again(k)): int(n) for k, n in _pairs(body, tag)})
    if tag == "__float__":
        if body not in ("nan", "inf", "-inf"):
            raise UnsafeFileError(f"unexpected float {body!r} in the file")
        return float(body)
    if tag == "__dtype__":
        return _torch_attribute(body, torch.dtype)
    if tag == "__torch__":
        return _torch_attribute(body, _TORCH_ENUMS)
    if tag == "__device__":
        return torch.device(_str(body, tag))
    if tag == "__slice__":
        start, stop, step = (again(v) for v in _list(body, tag, 3))
        return slice(start, stop, step)
    if tag == "__ellipsis__":
        return Ellipsis
    if tag == "__type__":
        if body not in _BUILTIN_TYPES:
            raise UnsafeFileError(f"the file names the type {body!r}; only {sorted(_BUILTIN_TYPES)} are read")
        return _BUILTIN_TYPES[body]
    if tag == "__path__":
        return pathlib.Path(_str(body, tag))
    if tag == "__treespec__":
        return treespec_loads(_str(body, tag))
    if tag == "__bytes__" and blob is not None:
        return blob(_str(body, tag))
    if tag == "__tensor__" and tensor is not None:
        return tensor(_str(body, tag))
    if tag == "__node__" and node is not None:
        return node(_str(body, tag))
    if tag == "__dataclass__" and dataclasses_allowed:
        return _dataclass(_str(body, tag), data.get("fields"), again)
    raise UnsafeFileError(f"the file holds a {tag.strip('_')!r} value where fxopt reads none")


def _dataclass(name: str, fields: Any, again: Callable[[Any], Any]) -> Any:
    """An instance of the dataclass ``module:QualName``, from a trusted module only."""
    module_name, _, qualname = name.partition(":")
    if not trusted_module(module_name):
        raise UnsafeFileError(f"the file names the type {module_name}.{qualname}, which is not a type of fxopt "
                              "or of a registered plugin: refused")
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise UnsafeFileError(f"the file names {module_name}.{qualname}, which is not a dataclass of this fxopt")
    if not isinstance(fields, dict):
        raise UnsafeFileError(f"the fields of {qualname} in the file are not a mapping")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: again(v) for k, v in fields.items() if k in known})


def treespec_loads(text: str) -> pytree.TreeSpec:
    """A pytree spec from its JSON. Every node type must be registered with pytree; the one
    module imported to find one is where transformers defines its output types (a model's
    ``modeling_*`` module or ``transformers.modeling_outputs``, whose import registers them):
    any other type must be registered before loading, and the error says which."""
    for name in set(_spec_types(text)) - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE):
        module = name.rpartition(".")[0]
        if _transformers_outputs(module) and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    try:
        return pytree.treespec_loads(text)
    except Exception as exc:
        missing = sorted(set(_spec_types(text)) - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE))
        if missing:
            module = missing[0].rpartition(".")[0]
            raise UnsafeFileError(
                f"the saved call signature uses the type {missing[0]}, which is not registered in this process; "
                f"import the module that defines it first (import {module}), then fxopt.load again") from exc
        raise UnsafeFileError(f"the saved call signature could not be read: {exc}") from exc


def _transformers_outputs(module: str) -> bool:
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts) or parts[0] != "transformers":
        return False
    return parts[1:] == ["modeling_outputs"] or (
        len(parts) == 4 and parts[1] == "models" and parts[3] == f"modeling_{parts[2]}")


def _spec_types(text: str) -> list[str]:
    import json

    found: list[str] = []

    def walk(entry: Any) -> None:
        if isinstance(entry, dict):
            if isinstance(entry.get("type"), str):
                found.append(entry["type"])
            for child in entry.get("children_spec", []) or []:
                walk(child)
        elif isinstance(entry, list):
            for child in entry:
                walk(child)

    try:
        walk(json.loads(text))
    except ValueError:
        pass
    return found


def _torch_attribute(name: Any, kind: Any) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise UnsafeFileError(f"the file names torch.{name}, which is not a torch {getattr(kind, '__name__', 'enum')}")
    return value


def _str(value: Any, tag: str) -> str:
    if not isinstance(value, str):
        raise UnsafeFileError(f"malformed {tag.strip('_')} entry in the file")
    return value


def _list(value: Any, tag: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise UnsafeFileError(f"malformed {tag.strip('_')} entry in the file")
    return value


def _pairs(value: Any, tag: str) -> list[list[Any]]:
    pairs = _list(value, tag)
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise UnsafeFileError(f"malformed {tag.strip('_')} entry in the file")
    return pairs


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise UnsafeFileError("a mapping key in the file is a list")
    return key
