"""Capture a model into fxopt's canonical IR.

``torch.export`` (non-strict) gives the ATen export IR. fxopt then freezes every
parameter, buffer and tensor constant into a ``get_attr`` constant it owns (a copy: the
user's tensors are never shared with a graph that passes rewrite), keeps the pytree specs
so the optimized module takes and returns what the model does, and canonicalizes.
"""

from __future__ import annotations

import linecache
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import CaptureError, InputError
from fxopt.ir import copy_graph_module, unique_attr_name


@dataclass(frozen=True)
class InputSpec:
    """What one flat tensor input must look like; ``None`` in ``shape`` is a dynamic size."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"shape ({dims}) and dtype {self.dtype}"


@dataclass
class Signature:
    """How the user's call maps to the graph's flat inputs and back."""

    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    inputs: list[InputSpec]
    leaf_names: list[str]

    def flatten(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None, *, what: str = "input") -> list[torch.Tensor]:
        """Flatten a call's arguments into the graph's inputs, checking each one."""
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            expected = _describe_structure(self.in_spec)
            got = _describe_structure(spec)
            raise InputError(f"{what} structure does not match the captured model: expected {expected}, got {got}")
        tensors: list[torch.Tensor] = []
        for position, (leaf, spec_entry) in enumerate(zip(flat, self.inputs)):
            check_input(leaf, spec_entry, position, what=what)
            tensors.append(leaf)
        return tensors

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        return pytree.tree_unflatten(list(outputs), self.out_spec)


def _describe_structure(spec: pytree.TreeSpec) -> str:
    args_spec, kwargs_spec = spec.children_specs
    n_args = args_spec.num_leaves
    keys = list(kwargs_spec.context or [])
    text = f"{n_args} positional tensor(s)"
    if keys:
        text += f" and keyword(s) {keys}"
    return text


def check_input(value: Any, spec: InputSpec, position: int, *, what: str = "input") -> None:
    label = f"{what} {position} ('{spec.name}')"
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{label}: expected a tensor with {spec.describe()}, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        raise InputError(f"{label}: expected dtype {spec.dtype}, got {value.dtype}")
    if value.dim() != len(spec.shape) or any(
        want is not None and want != got for want, got in zip(spec.shape, value.shape)
    ):
        got_dims = ", ".join(str(d) for d in value.shape)
        raise InputError(f"{label}: expected {spec.describe()}, got shape ({got_dims})")


def normalize_example_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Accept a tuple/list of inputs, or one tensor; refuse anything else with a clear error."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if example_inputs is None:
        raise InputError("example_inputs is required: a tuple of tensors the model can be called with")
    raise InputError(
        f"example_inputs must be a tuple of tensors (or one tensor), got {type(example_inputs).__name__}"
    )


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Capture ``model`` into fxopt's canonical IR (frozen weights, ``meta["val"]`` everywhere).

    The graph module's ``meta["fxopt_signature"]`` holds the :class:`Signature` that maps
    the user's call onto the graph's flat inputs and outputs.
    Raises :class:`fxopt.CaptureError` naming the module and source line that failed.
    """
    from fxopt.canonicalize import canonicalize

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = normalize_example_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    try:
        with torch.no_grad():
            exported = _export(model, args, kwargs, dynamic_shapes)
    except Exception as exc:  # export raises many types; all become one clear error
        raise _capture_error(model, exc) from exc
    gm = freeze(exported)
    canonicalize(gm)
    # torch.export keeps the nodes of the last exported graph in a module-level map
    # (proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT) until the next export, and
    # those nodes keep their module alive: return a copy and leave that module no weights.
    owned = copy_graph_module(gm)
    gm._buffers.clear()
    gm.meta = {}
    return owned


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any) -> Any:
    """Non-strict export to the training IR (ATen ops before decomposition).

    torch 2.7+ returns that IR from ``export``; 2.5 and 2.6 name it ``export_for_training``
    (their ``export`` already decomposes, e.g. ``linear`` into ``addmm``).
    """
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    exporter = torch.export.export
    if version < (2, 7) and hasattr(torch.export, "export_for_training"):
        exporter = torch.export.export_for_training
    return exporter(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)


def freeze(exported: torch.export.ExportedProgram) -> fx.GraphModule:
    """Turn an ExportedProgram into a GraphModule whose weights are its own constants."""
    from torch.export.graph_signature import InputKind, OutputKind

    signature = exported.graph_signature
    for spec in signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(
                f"the model updates state during its forward pass ({spec.kind.name} of "
                f"'{spec.target}'); fxopt optimizes pure inference graphs",
                hint="call model.eval() and make sure forward does not write buffers or inputs in place",
            )
    gm = exported.graph_module
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    copies: dict[int, torch.Tensor] = {}  # keeps tied weights tied
    sources: dict[str, torch.Tensor] = {}  # original name -> frozen copy
    leaf_names: list[str] = []
    inputs: list[InputSpec] = []
    first_real = next(n for n in graph.nodes if n.op != "placeholder")
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            fake = node.meta.get("val")
            if not isinstance(fake, torch.Tensor):
                raise CaptureError(f"input '{spec.arg.name}' is not a tensor; fxopt takes tensor inputs only")
            shape = tuple(d if isinstance(d, int) else None for d in fake.shape)
            inputs.append(InputSpec(spec.arg.name, shape, fake.dtype))
            leaf_names.append(spec.arg.name)
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            source = exported.state_dict.get(spec.target)
            if source is None:  # non-persistent buffers live in constants
                source = exported.constants[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            source = exported.constants[spec.target]
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind.name} for '{spec.target}'")
        if not isinstance(source, torch.Tensor):
            raise CaptureError(f"constant '{spec.target}' is a {type(source).__name__}, not a tensor")
        frozen = copies.get(id(source))
        if frozen is None:
            frozen = source.detach().clone()
            copies[id(source)] = frozen
        sources[spec.target] = frozen
        name = unique_attr_name(gm, spec.target, prefix="p_")
        gm.register_buffer(name, frozen)
        with graph.inserting_before(first_real):
            attr = graph.get_attr(name)
        attr.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    # The exported module registered the original parameters too: drop them so the
    # graph module owns only frozen copies.
    for name in [n for n, _ in gm.named_parameters(recurse=False)]:
        delattr(gm, name)
    for child in [c for c, m in gm.named_children() if not isinstance(m, fx.GraphModule)]:
        delattr(gm, child)
    graph.lint()
    gm.recompile()
    call_spec = exported.call_spec
    gm.meta["fxopt_signature"] = Signature(call_spec.in_spec, call_spec.out_spec, inputs, leaf_names)
    gm.meta["fxopt_sources"] = sources
    return gm


# ---------------------------------------------------------------- error reporting

_HINTS = (
    ("DynamicCache", "build the model with use_cache=False (or pass use_cache=False): fxopt captures stateless forward passes"),
    ("data-dependent", "make control flow depend on shapes, not tensor values, or express it with torch.cond"),
    ("Could not guard on data-dependent", "make control flow depend on shapes, not tensor values, or express it with torch.cond"),
    ("not a known type", "return tensors, tuples, lists, dicts or dataclasses registered with torch.utils._pytree"),
    ("Constraints violated", "remove the dynamic_shapes entry for that dimension, or make the model accept any size there"),
    ("mat1 and mat2 shapes cannot be multiplied", "check the example inputs' shapes against the model's first layer"),
    ("must have same reduction dim", "check the example inputs' shapes against the model's first layer"),
    ("expected m1 and m2 to have the same dtype", "check the example inputs' dtype against the model's weights"),
    ("should be the same", "check the example inputs' dtype and device against the model's weights"),
)


def _capture_error(model: torch.nn.Module, exc: BaseException) -> CaptureError:
    module_path, source = _failing_location(model, exc)
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    hint = next((h for key, h in _HINTS if key in str(exc)), None)
    if hint is None:
        hint = "check that model(*example_inputs) runs in eager mode; run with --debug (CLI) or inspect __cause__ for the full trace"
    return CaptureError(f"could not capture {type(model).__name__}: {text}", module_path=module_path, source=source, hint=hint)


def _failing_location(model: torch.nn.Module, exc: BaseException) -> tuple[str | None, str | None]:
    """The deepest user module on the failing stack, and the user source line that failed."""
    names = {id(m): name for name, m in model.named_modules()}
    module_path: str | None = None
    source: str | None = None
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(__file__)
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            module_path = names[id(owner)] or "<root>"
        if not filename.startswith((torch_dir, own_dir)) and "site-packages/torch" not in filename:
            line = linecache.getline(filename, lineno).strip()
            source = f"{_short(filename)}:{lineno}" + (f" `{line}`" if line else "")
    return module_path, source


def _short(filename: str) -> str:
    cwd = os.getcwd()
    if filename.startswith(cwd + os.sep):
        return os.path.relpath(filename, cwd)
    for path in sys.path:
        if path and filename.startswith(path + os.sep) and "site-packages" in path:
            return os.path.relpath(filename, path)
    return filename
