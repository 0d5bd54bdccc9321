"""``torch.compile(model, backend="fxopt")``: fxopt as a TorchDynamo backend.

The backend is found through the ``torch_dynamo_backends`` entry point, so it works
without importing fxopt first. Options come through ``torch.compile``::

    compiled = torch.compile(model, backend="fxopt",
                             options={"passes": ["swap-activations"], "backend": "onnx"})

Dynamo hands the backend one torch-level FX graph per piece of the program between graph
breaks, with the model's parameters and buffers as graph inputs. For each piece fxopt

1. freezes the parameter and buffer inputs (and the float module attributes dynamo passes
   as 0-d tensors) into a wrapper module around the piece, and captures that wrapper with
   ``fxopt.capture``: the same canonical IR ``fxopt.compile`` builds, so every weight pass
   applies; sizes dynamo made symbolic stay dynamic;
2. runs the verified pass pipeline and lowers to eager PyTorch or ONNX Runtime
   (a :class:`fxopt.session.Session` on the captured graph);
3. returns a function that, on every call, checks that the frozen tensors are the ones the
   call passes and that nobody wrote to them (``tensor._version``). If a weight changed
   (``load_state_dict``, an in-place update, a replaced parameter) the piece is optimized
   again with the new weights, or, with ``on_weight_change="raise"``, raises
   :class:`fxopt.BackendError`. The one write this cannot see is one through ``.data``
   (``w.data.mul_(2)``): ``.data`` has a version counter of its own, so the piece keeps the weights
   it froze (a snapshot) and a :class:`FrozenWeightsWarning` says so when a piece with weights is
   optimized. Write to the parameter (under ``torch.no_grad()``) or call ``torch._dynamo.reset()``.

A piece that cannot be captured or verified runs as dynamo traced it, with a warning (``strict=True``
raises instead). What happened is recorded in a :class:`CompileLog`.
"""

from __future__ import annotations

import re
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import BackendError, FxoptError
from fxopt.report import Report

OPTIONS = ("passes", "backend", "strict", "on_weight_change", "log", "share_weights", "measure")
MAX_RECORDS = 256


@dataclass
class GraphRecord:
    """One graph dynamo handed to the backend (a piece of the program between graph breaks)."""

    index: int
    inputs: list[str]
    report: Report
    weights: int = 0  # frozen parameter/buffer inputs
    reoptimized: int = 0  # times the piece was optimized again after a weight changed
    fallback: str | None = None  # why the piece runs unoptimized, when it does
    module: Callable[[], Any] = field(default=lambda: None, repr=False)  # weakref to the optimized module

    def __str__(self) -> str:
        head = f"graph {self.index}: inputs {', '.join(self.inputs) or 'none'}, {self.weights} frozen weights"
        if self.reoptimized:
            head += f", re-optimized {self.reoptimized}x after weight changes"
        if self.fallback:
            return f"{head}\n  runs unoptimized: {self.fallback}"
        return f"{head}\n{self.report}"


@dataclass
class CompileLog:
    """What the fxopt backend compiled: one :class:`GraphRecord` per graph, in order.

    Pass your own with ``options={"log": log}``; otherwise records go to the process-wide
    log returned by :func:`compile_log` (the last 256 graphs).
    """

    records: list[GraphRecord] = field(default_factory=list)

    @property
    def compiles(self) -> int:
        """How many graphs dynamo handed the backend (graph breaks and recompiles each add one)."""
        return len(self.records)

    @property
    def reports(self) -> list[Report]:
        return [r.report for r in self.records]

    def clear(self) -> None:
        self.records.clear()

    def _add(self, record: GraphRecord) -> None:
        self.records.append(record)
        del self.records[:-MAX_RECORDS]

    def __str__(self) -> str:
        return "\n".join([f"fxopt torch.compile backend: {self.compiles} graph(s) compiled"]
                         + [str(r) for r in self.records])


_DEFAULT_LOG = CompileLog()


def compile_log() -> CompileLog:
    """The log of graphs compiled without an explicit ``options={"log": ...}``."""
    return _DEFAULT_LOG


def last_reports() -> list[Report]:
    """The reports of the graphs in :func:`compile_log`, oldest first."""
    return _DEFAULT_LOG.reports


@dataclass(frozen=True)
class _Settings:
    passes: Any = None
    backend: str = "eager"
    strict: bool = False
    on_weight_change: str = "recompile"
    log: CompileLog = field(default_factory=lambda: _DEFAULT_LOG)
    share_weights: bool = False
    measure: bool = True  # kernel choices timed on this machine (False: the timing cache, else the default order)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, mode: str | None) -> _Settings:
        if mode not in (None, "default"):
            raise BackendError(f"the fxopt backend has no compile modes (got mode={mode!r}); use options=")
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise BackendError(f"unknown fxopt backend option(s) {unknown} (options: {', '.join(OPTIONS)})")
        settings = cls(**options)
        from fxopt.backends import get_backend

        get_backend(settings.backend)  # an unknown or uninstalled backend fails here, saying why
        if settings.on_weight_change not in ("recompile", "raise"):
            raise BackendError(f"on_weight_change must be 'recompile' or 'raise', got {settings.on_weight_change!r}")
        return settings


class FrozenWeightsWarning(UserWarning):
    """A compiled piece froze weights: writes through ``.data`` will not be seen."""


FROZEN_WEIGHTS_MESSAGE = (
    "fxopt: torch.compile froze the model's weights; writes through .data "
    "(w.data.mul_(2)) bypass the version counter fxopt watches and are not seen: write to the "
    "parameter under torch.no_grad(), or call torch._dynamo.reset() after such a write")
SHARED_WEIGHTS_MESSAGE = (
    "fxopt: torch.compile uses the model's weights as they are (share_weights=True); writes through "
    ".data (w.data.mul_(2)) bypass the version counter fxopt watches: they reach the weights no pass "
    "rewrote but not the rewritten ones (quantized, merged); write to the parameter under "
    "torch.no_grad(), or call torch._dynamo.reset() after such a write")


def fxopt_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The TorchDynamo backend: optimize one dynamo graph; see the module docstring.

    Options: ``passes`` (as in ``fxopt.compile``), ``backend`` (``"eager"``, ``"onnx"`` or an
    installed optional backend, see :mod:`fxopt.backends`), ``strict`` (raise instead of rolling
    back a pass or running a piece unoptimized), ``on_weight_change`` (``"recompile"`` or
    ``"raise"``), ``log`` (a :class:`CompileLog`), ``share_weights`` (False: a snapshot copy of
    the weights; True: the model's own tensors), ``measure`` (as in ``fxopt.compile``)."""
    from fxopt.registry import resolve_passes

    settings = _Settings.from_options(options, mode)
    pipeline = resolve_passes(settings.passes)
    return _Piece(gm, list(example_inputs), settings, pipeline)


fxopt_backend.reset = _DEFAULT_LOG.clear  # type: ignore[attr-defined]  # torch._dynamo.reset() calls it


# ---------------------------------------------------------------- one graph


@dataclass
class _Slot:
    """How one placeholder of the dynamo graph is fed."""

    # "input" (a user input), "weight" (frozen tensor), "scalar" (frozen number passed as a tensor),
    # "number" (a Python int input, specialized to its value), "size" (a dimension of a user input)
    kind: str
    name: str
    position: int  # among the dynamo graph's inputs
    input_index: int = -1  # "input" and "size": which user input
    dim: int = -1  # "size": which dimension of that input


class _Unsupported(Exception):
    pass


class _Piece:
    """The compiled function dynamo calls with the graph's inputs (weights included)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], settings: _Settings, pipeline: list[Any]) -> None:
        self.gm = gm
        self.settings = settings
        self.pipeline = pipeline
        self.log = settings.log
        self.record = GraphRecord(len(self.log.records), [], Report(backend=settings.backend))
        self.log._add(self.record)
        self.optimized: Callable[..., Any] | None = None
        try:
            self.slots = _slots(gm, example_inputs)
            self.record.inputs = [_describe(example_inputs[s.position]) for s in self.slots if s.kind == "input"]
            self.record.weights = sum(s.kind == "weight" for s in self.slots)
            with _outside_dynamo_tracing():
                self._optimize(example_inputs)
        except (FxoptError, _Unsupported) as exc:
            if settings.strict:
                raise
            self.record.fallback = str(exc)
            warnings.warn(f"fxopt: torch.compile graph {self.record.index} runs unoptimized: {exc}", stacklevel=2)

    def _optimize(self, args: Sequence[Any]) -> None:
        from fxopt.capture import capture
        from fxopt.session import Session, SessionOptions

        user = [args[s.position] for s in self.slots if s.kind == "input"]
        if any(torch._subclasses.fake_tensor.is_fake(t) for t in user):
            raise _Unsupported("dynamo passed fake example inputs; fxopt verifies passes on real data")
        report = Report(model=f"dynamo graph {self.record.index}", backend=self.settings.backend)
        wrapper = _FrozenGraph(self.gm, self.slots, args)
        start = time.perf_counter()
        # By default a snapshot (copies): a write through .data, which no version counter shows,
        # must not reach the graph half-way (unchanged weights seen, merged ones not). Shared:
        # no copy of a large model, and its pieces share what passes derive (quantized weights).
        captured = capture(wrapper, tuple(user), dynamic_shapes=_dynamic_shapes(self.gm, self.slots),
                           share_weights=self.settings.share_weights)
        report.capture_seconds = time.perf_counter() - start
        _refuse_training_graph(captured)
        batches = [captured.meta["fxopt_signature"].flatten(user, None, what="example input")]
        options = SessionOptions(strict=self.settings.strict, measure=self.settings.measure)
        session = Session.from_graph(captured, batches, report, options=options)
        optimized = session.compile(self.pipeline, self.settings.backend)
        self._frozen = [(s.position, args[s.position], _state(args[s.position])) for s in self.slots if s.kind == "weight"]
        if self._frozen:
            # One message from one place: Python's default filter shows it once per process.
            warnings.warn(SHARED_WEIGHTS_MESSAGE if self.settings.share_weights else FROZEN_WEIGHTS_MESSAGE,
                          FrozenWeightsWarning, stacklevel=3)
        self._scalars = [(s.position, float(args[s.position])) for s in self.slots if s.kind == "scalar"]
        self._numbers = [(s.position, _number(args[s.position])) for s in self.slots if s.kind == "number"]
        self._user_positions = [s.position for s in self.slots if s.kind == "input"]
        self.optimized = optimized
        self.record.report = optimized.report
        self.record.module = weakref.ref(optimized)

    def _number_changed(self, args: Sequence[Any]) -> str | None:
        for position, value in self._numbers:
            if int(args[position]) != value:
                return f"input '{self.slots_by_position[position]}' changed from {value} to {int(args[position])}"
        return None

    def _changed(self, args: Sequence[Any]) -> str | None:
        for position, tensor, state in self._frozen:
            current = args[position]
            if current is not tensor:
                return f"weight '{self.slots_by_position[position]}' was replaced by another tensor"
            if _state(current) != state:
                return f"weight '{self.slots_by_position[position]}' was modified after compiling"
        for position, value in self._scalars:
            if float(args[position]) != value:
                return f"module attribute '{self.slots_by_position[position]}' changed from {value} to {float(args[position])}"
        return None

    @property
    def slots_by_position(self) -> dict[int, str]:
        return {s.position: s.name for s in self.slots}

    def __call__(self, *args: Any) -> Any:
        if self.optimized is None:
            return self.gm(*args)
        # The graph holds a number as a constant: a new value needs a new graph (the way dynamo
        # recompiles on a specialized int), whatever on_weight_change says of weights.
        change = self._number_changed(args)
        weight_change = None if change else self._changed(args)
        if weight_change is not None and self.settings.on_weight_change == "raise":
            raise BackendError(f"fxopt froze the weights of torch.compile graph {self.record.index}, but "
                               f"{weight_change}; call torch._dynamo.reset() and compile again, or use "
                               "options={'on_weight_change': 'recompile'}")
        if change or weight_change:
            self._optimize(args)
            self.record.reoptimized += 1
            self.record.report.notes.append(f"re-optimized because {change or weight_change}")
        return self.optimized(*[args[p] for p in self._user_positions])


def _state(tensor: torch.Tensor) -> tuple[int, int]:
    # In-place writes bump the version counter; ``param.data = other`` does not, but moves
    # the data. Shape, dtype and device changes are dynamo's guards' business.
    return tensor._version, tensor.data_ptr()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{', '.join(str(d) for d in value.shape)}]"
    return type(value).__name__


# ---------------------------------------------------------------- freezing


_KEY = re.compile(r"\['([^']*)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")
_NOISE = {"self", "_modules", "_parameters", "_buffers"}


def _readable_name(source: Any, fallback: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc_weight``."""
    if source is None:
        return fallback
    parts = [a or b for a, b in _KEY.findall(source.name)]
    parts = [p for p in parts if p not in _NOISE]
    name = re.sub(r"[^0-9A-Za-z_]+", "_", "_".join(parts)).strip("_")
    return name or fallback


def _is_weight(source: Any, value: Any) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return True
    if source is None:
        return False
    from torch._dynamo.source import is_from_unspecialized_param_buffer_source

    return is_from_unspecialized_param_buffer_source(source) or any(
        key in source.name for key in ("._parameters[", "._buffers[")
    )


def _slots(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[_Slot]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _Unsupported(f"the graph has {len(placeholders)} inputs but dynamo gave {len(example_inputs)} examples")
    slots: list[_Slot] = []
    user_tensors: list[tuple[int, Any]] = []  # (user input index, example value with symbolic sizes)
    pending_sizes: list[tuple[_Slot, Any]] = []
    for position, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = _readable_name(source, node.name)
        if isinstance(value, torch.Tensor) and getattr(grapharg, "pass_arg_as_tensor", False):
            if value.numel() != 1:
                raise _Unsupported(f"input '{name}' is a Python number passed as a tensor of {value.numel()} elements")
            slots.append(_Slot("scalar", name, position))
        elif isinstance(value, torch.Tensor) and _is_weight(source, value):
            slots.append(_Slot("weight", name, position))
        elif isinstance(value, torch.Tensor):
            slot = _Slot("input", name, position, input_index=len(user_tensors))
            user_tensors.append((slot.input_index, node.meta.get("example_value")))
            slots.append(slot)
        elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            slot = _Slot("size", name, position)
            pending_sizes.append((slot, node.meta.get("example_value")))
            slots.append(slot)
        else:
            raise _Unsupported(f"input '{name}' is a {type(value).__name__}; fxopt takes tensor inputs and sizes")
    for slot, symbol in pending_sizes:
        found = _find_size(symbol, user_tensors)
        if found is None:
            # A Python int argument (transformers' ``logits_to_keep``) that dynamo made symbolic:
            # specialized to its value like a frozen scalar, and guarded on each call.
            slot.kind = "number"
            continue
        slot.input_index, slot.dim = found
    return slots


def _number(value: Any) -> int:
    """The value of an int input; a symbolic one's example value, read without the guard that
    ``int()`` would add to dynamo's shapes (the piece guards the value itself)."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise _Unsupported(f"int input {value} has no example value")
        return int(hint)
    return int(value)


def _find_size(symbol: Any, user_tensors: list[tuple[int, Any]]) -> tuple[int, int] | None:
    if not isinstance(symbol, torch.SymInt):
        return None
    for index, fake in user_tensors:
        if not isinstance(fake, torch.Tensor):
            continue
        for dim, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and size.node.expr == symbol.node.expr:
                return index, dim
    return None


class _FrozenGraph(torch.nn.Module):
    """A dynamo graph whose weights are attributes: calling it takes only the user inputs."""

    def __init__(self, gm: fx.GraphModule, slots: list[_Slot], args: Sequence[Any]) -> None:
        super().__init__()
        self.graph_module = _scalars_as_constants(gm, slots, args)
        self.slots = slots
        self.numbers = {s.position: _number(args[s.position]) for s in slots if s.kind == "number"}
        self.attrs: dict[int, str] = {}
        for slot in slots:
            if slot.kind in ("weight", "scalar"):
                attr = _unique(self, slot.name)
                self.register_buffer(attr, args[slot.position].detach())
                self.attrs[slot.position] = attr

    def forward(self, *inputs: torch.Tensor) -> Any:
        args: list[Any] = []
        for slot in self.slots:
            if slot.kind == "input":
                args.append(inputs[slot.input_index])
            elif slot.kind == "size":
                args.append(inputs[slot.input_index].shape[slot.dim])
            elif slot.kind == "number":
                args.append(self.numbers[slot.position])
            else:
                args.append(getattr(self, self.attrs[slot.position]))
        return self.graph_module(*args)


def _unique(module: torch.nn.Module, base: str) -> str:
    base = base if base and not base[0].isdigit() else f"w_{base}"
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _scalars_as_constants(gm: fx.GraphModule, slots: list[_Slot], args: Sequence[Any]) -> fx.GraphModule:
    """A copy of ``gm`` where ``scalar.item()`` on a frozen number, and a Python int input, read
    the number itself."""
    scalar_positions = {s.position for s in slots if s.kind == "scalar"}
    number_positions = {s.position for s in slots if s.kind == "number"}
    if not scalar_positions and not number_positions:
        return gm
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for position in number_positions:
        placeholders[position].replace_all_uses_with(_number(args[position]))  # type: ignore[arg-type]
    for position in scalar_positions:
        value = args[position].item()
        for user in list(placeholders[position].users):
            if user.op == "call_method" and user.target == "item":
                user.replace_all_uses_with(value)  # type: ignore[arg-type]
                gm.graph.erase_node(user)
    gm.recompile()
    return gm


def _dynamic_shapes(gm: fx.GraphModule, slots: list[_Slot]) -> tuple[Any, ...] | None:
    """Keep dynamic the sizes dynamo made symbolic (automatic dynamic or dynamic=True)."""
    from torch.export import Dim

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = []
    for slot in slots:
        if slot.kind != "input":
            continue
        fake = placeholders[slot.position].meta.get("example_value")
        shape = fake.shape if isinstance(fake, torch.Tensor) else ()
        specs.append({d: Dim.AUTO for d, size in enumerate(shape) if not isinstance(size, int)} or None)
    if not any(specs):
        return None
    return (tuple(specs),)


class _outside_dynamo_tracing:
    """Hide dynamo's tracing context while fxopt works on its own graph.

    fxopt's capture runs its own torch.export, and shape propagation looks for the fake mode
    of the graph it works on; with dynamo's context visible both would find dynamo's fake
    mode instead and add guards to dynamo's shape environment (specializing its graph).
    """

    def __enter__(self) -> None:
        from torch._guards import tracing

        self._context = tracing(None)
        self._context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


def _refuse_training_graph(gm: fx.GraphModule) -> None:
    from fxopt.ir import arg, call_nodes, ops

    for node in call_nodes(gm, ops.dropouts):
        if arg(node, 2, "train", True) and float(arg(node, 1, "p", 0.5)) > 0:
            raise _Unsupported("the graph has active dropout (the model is in training mode); "
                               "call model.eval() before torch.compile")
