"""The optimized model: what every entry point returns."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import FxoptError, InputError
from fxopt.ir import copy_graph_module
from fxopt.report import Report
from fxopt.signature import Signature


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original.

    ``graph_module`` is the optimized fx graph and ``report`` says how it was made.
    Inputs are checked against the captured signature (count, dtype, static sizes).

    Where the runner holds a weight in a packed form of its own (oneDNN's int8 layout, say:
    ``packed``, see :class:`fxopt.backends.Lowered`), the module keeps that copy alone:
    ``graph_module`` unpacks such weights when read, into a module that lives as long as the
    caller holds it (:func:`fxopt.save` reads it so).

    Save it with :func:`fxopt.save` (``torch.save`` cannot pickle a lowered module and
    says so). Its dtype and device are fixed at compile time: ``.half()``, ``.to(dtype)``
    and ``.to(other_device)`` raise; compile the converted model instead.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        signature: Signature,
        report: Report,
        runner: Any = None,
        device: torch.device | None = None,
        packed: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module  # a submodule: the property below reads it back
        self.signature = signature
        self.report = report
        self.device = device
        self._runner = runner
        self._packed = dict(packed or {})
        self._unpacked: weakref.ref[fx.GraphModule] | None = None
        for target in self._packed:  # the runner's packed copy is the one kept
            graph_module.register_buffer(target, torch.empty_like(graph_module.get_buffer(target), device="meta"))

    @property
    def graph_module(self) -> fx.GraphModule:
        """The optimized graph, with every weight as a plain tensor."""
        held = self._modules["graph_module"]
        if not self._packed:
            return held
        unpacked = self._unpacked() if self._unpacked is not None else None
        if unpacked is None:
            unpacked = copy_graph_module(held)
            for target, unpack in self._packed.items():
                unpacked.register_buffer(target, unpack())
            self._unpacked = weakref.ref(unpacked)
        return unpacked

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """nn.Module's, with the weights held packed unpacked (not their meta placeholders)."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for target, unpack in self._packed.items():
            key = f"{prefix}graph_module.{target}"
            if key in state:
                state[key] = unpack()
        return state

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> OptimizedModule:
        # nn.Module's .half()/.to()/.cuda() convert the weights one by one behind the
        # lowered runner's back (an ONNX Runtime session, int8 kernels): find out what ``fn``
        # would do on an empty tensor of each kind held here, and refuse any change.
        # The module's device, not the tensors': an ONNX Runtime module keeps meta tensors.
        home = self.device or torch.device("cpu")
        held = self._modules["graph_module"]
        kinds = {(t.dtype, home) for t in [*held.buffers(), *held.parameters()]}
        for dtype, device in sorted(kinds, key=str):
            probe = fn(torch.empty(0, dtype=dtype, device=device))
            if isinstance(probe, torch.Tensor) and (probe.dtype, probe.device) != (dtype, device):
                change = f"dtype {dtype} to {probe.dtype}" if probe.dtype != dtype else f"device {device} to {probe.device}"
                what = (f"fxopt.compile(model.to({probe.dtype}), example_inputs converted the same way)"
                        if probe.dtype != dtype else f"fxopt.compile(model, example_inputs, device='{probe.device}')")
                raise FxoptError(f"an optimized module cannot change its {change} after compilation: "
                                 f"its graph was verified and lowered for the original; compile again with {what}")
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        _discard_partial_torch_save()
        raise FxoptError("an optimized module cannot be pickled (torch.save): its lowered runner is not "
                         "picklable; use fxopt.save(opt, path) and fxopt.load(path)")

    def __deepcopy__(self, memo: dict[int, Any]) -> OptimizedModule:
        # The runner (lowered kernels, an ONNX Runtime session) holds no state between runs:
        # the copy shares it and gets its own graph, signature and report.
        return OptimizedModule(copy.deepcopy(self._modules["graph_module"], memo), copy.deepcopy(self.signature, memo),
                               copy.deepcopy(self.report, memo), self._runner, self.device, self._packed)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.signature.flatten(args, kwargs)
        if self.device is not None:
            for position, tensor in enumerate(flat):
                if tensor.device.type != self.device.type:
                    raise InputError(
                        f"input {position} ('{self.signature.leaf_names[position]}') is on "
                        f"{tensor.device}, but the optimized module runs on {self.device}"
                    )
        runner = self._runner if self._runner is not None else self.graph_module
        outputs = runner(*flat)
        if not isinstance(outputs, (list, tuple)):
            outputs = (outputs,)
        return self.signature.unflatten(list(outputs))

    def extra_repr(self) -> str:
        return f"backend={self.report.backend}, device={self.report.device}"


def _discard_partial_torch_save() -> None:
    """Remove the file a failing ``torch.save(opt, path)`` has already created.

    torch.save opens (and truncates) ``path`` before it pickles anything, so raising from
    ``__reduce_ex__`` would otherwise leave a truncated, unloadable file behind.
    """
    import os
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "save" and frame.f_globals.get("__name__") == "torch.serialization":
            target = frame.f_locals.get("f")
            if isinstance(target, (str, os.PathLike)):
                with contextlib.suppress(OSError):
                    os.remove(target)
            return
        frame = frame.f_back
