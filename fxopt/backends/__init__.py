"""Backends lower the optimized graph to something that runs.

A backend is a :class:`Backend`: a name, the modules it needs, the pip extra that installs
them, the devices it runs on, and ``lower(gm, signature, example_inputs, device, report) ->
Lowered``. Backends are plugins, found through the ``fxopt.backends`` entry-point group (the
built-in ones take that path too)::

    [project.entry-points."fxopt.backends"]
    mybackend = "mypackage.fxopt_backend:BACKEND"      # a Backend, or a bare lower function

Each backend runs the registered lowerings that apply to it (:func:`fxopt.lowering.lower_graph`)
and names none: kernels for fused or lower-precision patterns come in as lowering plugins.
A backend whose modules are not installed stays registered but unavailable:
:func:`backend_names` lists the available ones, and asking for the others raises
:class:`~fxopt.errors.BackendError` naming the package and the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import BackendError
from fxopt.registrations import Registrations
from fxopt.verify import Parity

ENTRY_POINT_GROUP = "fxopt.backends"


@dataclass
class Lowered:
    """A lowered graph: ``run(*flat_inputs)`` returns the flat outputs.

    ``packed`` names constants of ``graph_module`` (by ``get_attr`` target) that ``run`` holds
    only in a packed form of its own, each with the function that gives the plain tensor back,
    exactly (the backend checked it): the optimized module then keeps one copy, the packed one,
    and unpacks on demand (:class:`fxopt.OptimizedModule`)."""

    graph_module: fx.GraphModule
    run: Callable[..., Any]
    packed: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


LowerFunction = Callable[[fx.GraphModule, Any, list[torch.Tensor], torch.device, Any], Lowered]


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    ``lower`` is the function or a ``"module:attribute"`` string resolved on first use, so
    declaring a backend imports nothing heavy. ``requires`` are the modules it imports; when
    one is missing the backend is unavailable and the error says ``pip install 'fxopt[extra]'``
    (or ``package``, for a plugin without an extra). ``restore`` rebuilds a saved module's
    runner from what the runner's ``saved_state()`` returned (see :mod:`fxopt.saving`);
    without it a saved module is lowered again from its stored graph when loaded.
    ``shares_weights``: the lowered module computes with the graph's own tensors (the model's,
    where no pass changed them), where a backend that exports the graph (ONNX Runtime,
    OpenVINO) holds a copy of the weights of its own.
    """

    name: str
    lower: LowerFunction | str
    requires: tuple[str, ...] = ()
    extra: str | None = None
    package: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    description: str = ""
    restore: Callable[..., Any] | None = None
    shares_weights: bool = False

    def missing(self) -> list[str]:
        """The modules ``requires`` names that are not installed."""
        return [module for module in self.requires if not _importable(module)]

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'fxopt[{self.extra}]'"
        return f"pip install {self.package or ' '.join(self.requires)}"

    def lower_function(self) -> LowerFunction:
        if not isinstance(self.lower, str):
            return self.lower
        module_name, _, attribute = self.lower.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_REGISTRATIONS: Registrations[Backend] = Registrations("backends")


def refresh() -> None:
    """Forget the loaded entry points (after installing a backend at run time)."""
    _REGISTRATIONS.current().discovered = None


def _discovered() -> dict[str, Backend | BackendError]:
    """Every declared backend; an entry point that fails to load is kept as the error that
    says why, raised when that backend is asked for."""
    state = _REGISTRATIONS.current()
    if state.discovered is None or state.discovered_for != tuple(sys.path):
        found: dict[str, Backend | BackendError] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                found[entry.name] = _backend(entry.name, entry.load())
            except ImportError as exc:
                found[entry.name] = BackendError(
                    f"backend {entry.name!r} ({entry.value}) could not be imported: {exc}; "
                    "install the package that provides it")
        state.discovered, state.discovered_for = found, tuple(sys.path)
    return state.discovered


def _backend(name: str, value: Any) -> Backend:
    if isinstance(value, Backend):
        if value.name != name:
            raise ValueError(f"entry point {name!r} loads a backend named {value.name!r}")
        return value
    if callable(value):
        return Backend(name, value)
    raise TypeError(f"entry point {name!r} is not a fxopt Backend or a lower function: {value!r}")


def registered_backends() -> dict[str, Backend | BackendError]:
    """Every declared backend by name, installed or not (an import failure as its error)."""
    _discovered()
    return _REGISTRATIONS.current().merged()


def backend_names(*, installed_only: bool = True) -> list[str]:
    """The names of the backends that can run here (every declared one with
    ``installed_only=False``)."""
    names = []
    for name, backend in registered_backends().items():
        if installed_only and (isinstance(backend, BackendError) or backend.missing()):
            continue
        names.append(name)
    return sorted(names)


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run here (on ``device``, when given), or None."""
    try:
        get_backend(name, device)
    except BackendError as exc:
        return str(exc)
    return None


def shares_weights(name: str) -> bool:
    """Whether backend ``name`` computes with the graph's own tensors (see :class:`Backend`)."""
    found = registered_backends().get(name)
    return isinstance(found, Backend) and found.shares_weights


def get_backend(name: str, device: torch.device | str | None = None) -> Backend:
    """The backend ``name``, checked to be installed (and to run on ``device``)."""
    found = registered_backends().get(name)
    if found is None:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(backend_names()) or 'none'})")
    if isinstance(found, BackendError):
        raise found
    missing = found.missing()
    if missing:
        raise BackendError(f"backend {name!r} needs {', '.join(missing)}, which is not installed: "
                           f"{found.install_hint()}")
    if device is not None:
        kind = torch.device(device).type
        if kind not in found.devices:
            raise BackendError(f"backend {name!r} runs on {', '.join(found.devices)} only, not {kind!r}; "
                               f"use device='cpu' or another backend ({', '.join(backend_names())})")
    return found


@contextmanager
def registered_backend(backend: Backend) -> Iterator[Backend]:
    """Register ``backend`` until the ``with`` block ends (tests, experiments)::

        with fxopt.backends.registered_backend(Backend("mine", lower_mine)):
            opt = fxopt.compile(model, inputs, backend="mine")
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"registered_backend takes a fxopt Backend, got {backend!r}")
    with _REGISTRATIONS.registered({backend.name: backend}):
        yield backend


def require_torch_device(device: torch.device) -> None:
    """Refuse a CUDA device this PyTorch cannot use (for backends that run PyTorch code)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device 'cuda' was requested but CUDA is not available on this machine")


def lower(
    name: str,
    gm: fx.GraphModule,
    signature: Any,
    example_inputs: list[torch.Tensor],
    device: torch.device,
    report: Any,
    parity: Parity | None = None,
) -> Lowered:
    """Lower ``gm`` with backend ``name``. ``parity`` (:class:`fxopt.verify.Parity`): what the
    verification already knows of ``gm``'s outputs, handed to a lowering that takes a
    ``parity`` argument (the built-in ones do) so its parity check runs nothing twice."""
    backend = get_backend(name, device)
    try:
        lowering = backend.lower_function()
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not available: {exc}; {backend.install_hint()}") from exc
    if parity is not None and _takes_parity(lowering):
        return lowering(gm, signature, example_inputs, device, report, parity=parity)
    return lowering(gm, signature, example_inputs, device, report)


def _takes_parity(lowering: LowerFunction) -> bool:
    try:
        return "parity" in inspect.signature(lowering).parameters
    except (TypeError, ValueError):
        return False
