"""Capture a model into fxopt's canonical IR.

``torch.export`` (non-strict) gives the ATen export IR. fxopt then freezes every
parameter, buffer and tensor constant into a ``get_attr`` constant it owns (a copy: the
user's tensors are never shared with a graph that passes rewrite), keeps the pytree specs
so the optimized module takes and returns what the model does, and canonicalizes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.errors import CaptureError, InputError
from fxopt.ir import copy_graph_module, size_hint, unique_attr_name
from fxopt.ir.shapes import stamp_shapes
from fxopt.phases import phase
from fxopt.signature import (  # noqa: F401 - part of fxopt.capture's interface
    InputSpec,
    Signature,
    check_input,
    normalize_example_inputs,
    split_example_inputs,
)

log = logging.getLogger("fxopt")


BATCH = "batch"
STATIC = "static"


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = BATCH,
    share_weights: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` into fxopt's canonical IR (frozen weights, ``meta["val"]`` everywhere).

    ``share_weights``: the graph's constants are the model's own tensors (no second copy;
    passes never write a constant in place, the pass manager checks it), or, with False,
    fxopt's copies of them (twice the memory; a model a faulty pass wrote to can then be
    restored from the copies).

    ``dynamic_shapes`` is ``"batch"`` (dim 0 of the inputs that share the first input's
    batch size is dynamic where the model allows it), ``"static"`` or ``None`` (every size
    as in the examples), or a ``torch.export`` spec (``{"x": {0: Dim("batch")}}``).

    The graph module's ``meta["fxopt_signature"]`` holds the :class:`Signature` that maps
    the user's call onto the graph's flat inputs and outputs; ``meta["fxopt_notes"]`` says
    what capture decided (a batch that had to stay static, say).
    Raises :class:`fxopt.CaptureError` naming the module and source line that failed, or
    the buffer a ``forward`` writes to.
    """
    from fxopt.canonicalize import canonicalize

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_example_inputs(example_inputs, example_kwargs)
    notes: list[str] = []
    exported = _export_with_shapes(model, args, kwargs, dynamic_shapes, notes)
    gm = freeze(exported, model, share_weights=share_weights)
    with phase("canonicalize"):
        canonicalize(gm, notes)
    # torch.export keeps the nodes of the last exported graph in a module-level map
    # (proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT) until the next export, and
    # those nodes keep their module alive: return a copy and leave that module no weights.
    owned = copy_graph_module(gm)
    gm._buffers.clear()
    gm.meta = {}
    if dynamic_shapes == BATCH:
        notes += _batch_notes(owned, args, kwargs)
    owned.meta["fxopt_notes"] = notes
    stamp_shapes(owned)  # export's values stand until a pass changes their nodes
    return owned


def _export_with_shapes(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any, notes: list[str]
) -> Any:
    if isinstance(dynamic_shapes, str) and dynamic_shapes not in (BATCH, STATIC):
        raise InputError(f"dynamic_shapes must be 'batch', 'static', None or a torch.export spec, got {dynamic_shapes!r}")
    if dynamic_shapes == BATCH:
        spec = batch_dynamic_shapes(model, args, kwargs)
        if spec is not None:
            try:
                return _quiet_export(model, args, kwargs, spec)
            except CaptureError as dynamic_failure:
                # A model may refuse a dynamic batch where it would capture a static one
                # (a reshape to a constant size, say): capture it static and say so.
                exported = _quiet_export(model, args, kwargs, None)
                notes.append(
                    "the batch dimension stayed static: capture with a dynamic batch failed "
                    f"({dynamic_failure.reason})"
                )
                return exported
        dynamic_shapes = None
    if dynamic_shapes == STATIC:
        dynamic_shapes = None
    return _quiet_export(model, args, kwargs, dynamic_shapes)


def batch_dynamic_shapes(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A ``torch.export`` spec that makes dim 0 dynamic for every tensor input whose dim 0
    equals the first tensor input's (the batch); None when there is no such input.

    ``Dim.AUTO`` lets export keep a size static where the model needs it to be (a batch
    of 1, a reshape to a constant), instead of failing.
    """
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not leaves:
        return None
    batch = leaves[0].shape[0]
    dim = getattr(torch.export.Dim, "AUTO", None) or torch.export.Dim("batch")

    def spec_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: dim} if value.dim() >= 1 and value.shape[0] == batch else None
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None  # export reports the real mismatch
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        parameter = bound.signature.parameters[name]
        if parameter.kind == inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {key: pytree.tree_map(spec_of, v) for key, v in value.items()}
        elif parameter.kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(pytree.tree_map(spec_of, v) for v in value)
        else:
            shapes[name] = pytree.tree_map(spec_of, value)
    return shapes


def _batch_notes(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    signature: Signature = gm.meta["fxopt_signature"]
    if not signature.inputs or any(i.shape and i.shape[0] is None for i in signature.inputs):
        return []
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not leaves:
        return []
    if leaves[0].shape[0] == 1:
        return ["the batch dimension is static: the example batch size is 1 (give examples with "
                "a batch of 2 or more for a dynamic batch)"]
    return ["the batch dimension is static: the model fixes it (export specialized it to the example's size)"]


def _quiet_export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any) -> Any:
    with _TorchOutput() as torch_output:
        try:
            with torch.no_grad():
                exported = _export(model, args, kwargs, dynamic_shapes)
        except Exception as exc:  # export raises many types; all become one clear error
            error = _capture_error(model, exc)
            failure = exc
        else:
            error = None
    if error is None:
        if torch_output.text():
            log.debug("torch's output during capture:\n%s", torch_output.text())
        return exported
    error.detail = torch_output.text()
    if error.detail:
        with contextlib.suppress(Exception):  # shown by tracebacks (the CLI's --debug)
            failure.__notes__ = [*getattr(failure, "__notes__", []), "torch's output during capture:\n" + error.detail]
    log.debug("capture failed; torch's output:\n%s", error.detail)
    raise error from failure


class _TorchOutput:
    """Keeps what torch logs and prints to stderr during export, instead of showing it.

    Export prints partial graphs to stderr and logs warnings through the ``torch`` loggers
    before it raises; fxopt's own error says what went wrong, and this text stays available
    as the error's ``detail`` (and in ``--debug`` tracebacks).
    """

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._handler = logging.StreamHandler(self._buffer)
        self._handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._stderr = contextlib.redirect_stderr(self._buffer)
        self._warnings = warnings.catch_warnings(record=True)
        self._caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> _TorchOutput:
        for name in ["torch", *[n for n in logging.root.manager.loggerDict if n.startswith("torch.")]]:
            logger = logging.getLogger(name)
            if name == "torch" or logger.handlers:
                self._saved.append((logger, list(logger.handlers), logger.propagate))
                logger.handlers = [self._handler] if name == "torch" else []
                logger.propagate = True if name != "torch" else False
        self._stderr.__enter__()
        self._caught = self._warnings.__enter__() or []
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._warnings.__exit__(*exc_info)
        self._stderr.__exit__(*exc_info)
        for logger, handlers, propagate in reversed(self._saved):
            logger.handlers = handlers
            logger.propagate = propagate
        for caught in self._caught:
            self._buffer.write(f"{caught.category.__name__}: {caught.message}\n")

    def text(self) -> str:
        return self._buffer.getvalue().strip()


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


def freeze(exported: torch.export.ExportedProgram, model: torch.nn.Module | None = None, *,
           share_weights: bool = False) -> fx.GraphModule:
    """Turn an ExportedProgram into a GraphModule whose weights are ``get_attr`` constants:
    the model's tensors themselves with ``share_weights`` (detached: same storage and version
    counter, so a write to either shows), else copies.

    A graph that writes to a parameter, buffer or input (``self.calls += 1``, a running
    average) is refused: freezing it would run the update on fxopt's copy, and the
    optimized module would compute something else than the model.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    signature = exported.graph_signature
    for spec in signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            target = spec.target or "?"
            what = "buffer" if spec.kind == OutputKind.BUFFER_MUTATION else "input" if spec.kind == OutputKind.USER_INPUT_MUTATION else "state"
            raise _state_write_error(model, what, target, _owner(target), None)
    gm = exported.graph_module
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    copies: dict[int, torch.Tensor] = {}  # keeps tied weights tied
    sources: dict[str, torch.Tensor] = {}  # original name -> frozen copy (none when shared)
    state_names: dict[fx.Node, tuple[str, str]] = {}  # graph node -> (kind, original name)
    leaf_names: list[str] = []
    inputs: list[InputSpec] = []
    first_real = next(n for n in graph.nodes if n.op != "placeholder")
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            fake = node.meta.get("val")
            if not isinstance(fake, torch.Tensor):
                raise CaptureError(f"input '{spec.arg.name}' is not a tensor; fxopt takes tensor inputs only")
            shape = tuple(_static_size(d) for d in fake.shape)
            inputs.append(InputSpec(spec.arg.name, shape, fake.dtype, tuple(size_hint(d) for d in fake.shape)))
            leaf_names.append(spec.arg.name)
            state_names[node] = ("input", spec.arg.name)
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
            frozen = source.detach() if share_weights else source.detach().clone()
            copies[id(source)] = frozen
        if not share_weights:
            sources[spec.target] = frozen
        name = unique_attr_name(gm, spec.target, prefix="p_")
        gm.register_buffer(name, frozen)
        with graph.inserting_before(first_real):
            attr = graph.get_attr(name)
        attr.meta["val"] = node.meta.get("val")
        kind = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}.get(spec.kind, "constant")
        state_names[attr] = (kind, str(spec.target))
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    _refuse_state_writes(graph, state_names, model)
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


def _static_size(size: Any) -> int | None:
    """``size`` as an int, or None when it is dynamic. A symbol export specialized while
    tracing (``reshape(x, [4, ...])`` pins the batch to 4) counts as static."""
    if isinstance(size, int):
        return size
    maybe_as_int = getattr(size.node, "maybe_as_int", None)
    value = maybe_as_int() if maybe_as_int is not None else None
    return int(value) if value is not None else None


def _refuse_state_writes(graph: fx.Graph, state_names: dict[fx.Node, tuple[str, str]], model: torch.nn.Module | None) -> None:
    from fxopt.canonicalize import alias_root, written_argument

    for node in graph.nodes:
        written = written_argument(node)
        if written is None:
            continue
        root = alias_root(written)
        if root in state_names:
            kind, name = state_names[root]
            owner = _owner(name) if kind != "input" else None
            raise _state_write_error(model, kind, name, owner, node)


def _owner(state_name: str) -> str:
    return state_name.rpartition(".")[0] or "<root>"


def _state_write_error(model: torch.nn.Module | None, kind: str, name: str, owner: str | None, node: fx.Node | None) -> CaptureError:
    model_name = type(model).__name__ if model is not None else "the model"
    op = f" ({node.target})" if node is not None else ""
    if kind == "input":
        message = f"could not capture {model_name}: forward writes to its input '{name}' in place{op}"
        hint = "write the result to a new tensor (x = x + 1, not x += 1)"
    else:
        message = (f"could not capture {model_name}: forward writes to its {kind} '{name}'{op}; "
                   "fxopt optimizes stateless inference graphs and would freeze that state")
        hint = ("call model.eval() if the update happens only in training mode, or move the update "
                "out of forward (compute it from the outputs instead)")
    return CaptureError(message, module_path=owner, source=_user_line(node), hint=hint)


def _user_line(node: fx.Node | None) -> str | None:
    """The last user-code frame of ``node``'s stack trace: ``file:line `code```."""
    trace = node.meta.get("stack_trace") if node is not None else None
    if not trace:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    lines = trace.strip().splitlines()
    found = None
    for index, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File \""):
            filename = line.split("\"")[1]
            if filename.startswith(torch_dir) or "site-packages/torch" in filename:
                continue
            lineno = line.split(", line ")[1].split(",")[0] if ", line " in line else "?"
            code = lines[index + 1].strip() if index + 1 < len(lines) and not lines[index + 1].strip().startswith("File ") else ""
            found = f"{_short(filename)}:{lineno}" + (f" `{code}`" if code else "")
    return found


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
    fixes = _suggested_fixes(str(exc))
    if fixes:
        # export's own fix (a Dim bounded by the model's position table, say) is the answer
        # the generic hint lacks, and it is past the message's first line
        hint = f"torch.export suggests {fixes}; or {hint}"
    return CaptureError(f"could not capture {type(model).__name__}: {text}", module_path=module_path, source=source, hint=hint)


def _suggested_fixes(message: str) -> str | None:
    """The lines under torch.export's ``Suggested fixes:`` (``seq = Dim('seq', max=64)``), joined."""
    lines = message.splitlines()
    if "Suggested fixes:" not in lines:
        return None
    fixes = []
    for line in lines[lines.index("Suggested fixes:") + 1:]:
        if not line.strip():
            break
        fixes.append(line.strip())
    return ", ".join(fixes) or None


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
