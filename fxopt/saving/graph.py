"""An fx graph as data: nodes with their op, name, target and arguments, constants by name.

    {"nodes": [{"name": "linear", "op": "call_function", "target": {"op": "aten::linear.default"},
                "args": [{"__node__": "x"}, {"__node__": "w"}, null], "kwargs": {}}, ...],
     "constants": {"w": {"key": "w"}, "b_meta": {"meta": [[16], {"__dtype__": "float32"}]}}}

Arguments are the values of :mod:`fxopt.saving.values` without dataclasses, plus node
references. Call targets are looked up by :mod:`fxopt.saving.trust`. Node names, placeholder
names, keyword names and attribute paths become Python identifiers in the code torch.fx
generates for the rebuilt graph, so each is checked to be a plain identifier first: nothing
from the file reaches that code except as a checked name or a ``repr`` of plain data.
"""

from __future__ import annotations

import keyword
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import FxoptError
from fxopt.saving.trust import resolve_target, target_name
from fxopt.saving.values import UnsafeFileError, decode, encode

OPS = ("placeholder", "get_attr", "call_function", "output")


def encode_graph(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``gm`` as data; its constants go into ``tensors`` (each distinct tensor once)."""
    nodes, constants = [], {}
    stored: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in OPS:
            raise FxoptError(f"cannot save node {node.name}: a saved graph has no {node.op} nodes")
        if node.op == "call_function":
            target: Any = target_name(node.target)
        else:
            target = node.target
        if node.op == "get_attr" and node.target not in constants:
            constants[node.target] = _constant(gm, node.target, tensors, stored, storages)
        where = f"node {node.name}"
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": encode(node.args, node=_reference, where=where),
                      "kwargs": encode(dict(node.kwargs), node=_reference, where=where)})
    return {"nodes": nodes, "constants": constants}


def _reference(node: fx.Node) -> dict[str, str]:
    return {"__node__": node.name}


def _constant(gm: fx.GraphModule, target: str, tensors: dict[str, torch.Tensor],
              stored: dict[tuple[Any, ...], str], storages: set[int]) -> dict[str, Any]:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise FxoptError(f"cannot save constant {target}: a {type(value).__name__}; a saved graph's constants "
                         "are tensors")
    entry: dict[str, Any] = {"parameter": True} if isinstance(value, torch.nn.Parameter) else {}
    if value.device.type == "meta":  # a backend that keeps the weights itself (ONNX Runtime, OpenVINO)
        return {**entry, "meta": encode([list(value.shape), value.dtype])}
    identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                tuple(value.stride()), value.dtype)
    if identity not in stored:  # a tied weight (one tensor under several names) is stored once
        data = value.detach().cpu().contiguous()
        pointer = data.untyped_storage().data_ptr()
        if pointer in storages or data.untyped_storage().nbytes() != data.numel() * data.element_size():
            data = data.clone()  # safetensors stores whole, unshared storages
        storages.add(data.untyped_storage().data_ptr())
        stored[identity] = target
        tensors[target] = data
    return {**entry, "key": stored[identity]}


def decode_graph(data: Any, constants: dict[str, torch.Tensor], device: torch.device) -> fx.GraphModule:
    """The GraphModule :func:`encode_graph` described, its constants taken from ``constants``
    (by key) and moved to ``device``."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise UnsafeFileError("the stored graph is malformed")
    root = torch.nn.Module()
    for target, entry in (data.get("constants") or {}).items():
        _attach(root, _attribute_path(target), _tensor(target, entry, constants, device))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}

    def node_ref(name: str) -> fx.Node:
        if name not in env:
            raise UnsafeFileError(f"the stored graph uses node {name!r} before defining it")
        return env[name]

    for entry in data["nodes"]:
        name, op = _identifier(entry.get("name"), "node name"), entry.get("op")
        if op not in OPS:
            raise UnsafeFileError(f"node {name}: unknown node kind {op!r}")
        target = entry.get("target")
        if op == "call_function":
            target = resolve_target(target)
        elif op == "placeholder":
            target = _identifier(target, "input name")
        elif op == "get_attr":
            _attribute_path(target)
            if target not in (data.get("constants") or {}):
                raise UnsafeFileError(f"node {name} reads constant {target!r}, which the file does not hold")
        else:
            target = "output"
        args = decode(entry.get("args", []), node=node_ref, dataclasses_allowed=False)
        kwargs = decode(entry.get("kwargs", {}), node=node_ref, dataclasses_allowed=False)
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise UnsafeFileError(f"node {name}: malformed arguments")
        for key in kwargs:
            _identifier(key, f"keyword of node {name}")
        if name in env:
            raise UnsafeFileError(f"the stored graph defines node {name!r} twice")
        node = graph.create_node(op, target, tuple(args), kwargs, name=name)
        if node.name != name:
            raise UnsafeFileError(f"node name {name!r} is not usable as a graph name")
        env[name] = node
    graph.lint()
    return fx.GraphModule(root, graph)


def _tensor(target: str, entry: Any, constants: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    if not isinstance(entry, dict):
        raise UnsafeFileError(f"constant {target!r}: malformed entry")
    if "meta" in entry:
        shape, dtype = decode(entry["meta"], dataclasses_allowed=False)
        if not isinstance(dtype, torch.dtype) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UnsafeFileError(f"constant {target!r}: malformed shape or dtype")
        value = torch.empty(shape, dtype=dtype, device="meta")
    elif entry.get("key") in constants:
        value = constants[entry["key"]]
        if device.type != "cpu":
            value = value.to(device)
    else:
        raise UnsafeFileError(f"constant {target!r} is not among the file's stored tensors")
    return torch.nn.Parameter(value, requires_grad=False) if entry.get("parameter") else value


def _attach(root: torch.nn.Module, path: list[str], value: torch.Tensor) -> None:
    module = root
    for part in path[:-1]:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(path[-1], value)
    else:
        module.register_buffer(path[-1], value)


def _identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value) or value.startswith("__"):
        raise UnsafeFileError(f"{what} {value!r} in the file is not a plain Python identifier")
    return value


def _attribute_path(value: Any) -> list[str]:
    if not isinstance(value, str):
        raise UnsafeFileError(f"constant name {value!r} in the file is not a string")
    return [_identifier(part, "constant name") for part in value.split(".")]
