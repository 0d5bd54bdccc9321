"""The optimized model: what every entry point returns."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import FxoptError, InputError
from fxopt.report import Report
from fxopt.signature import Signature


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original.

    ``graph_module`` is the optimized fx graph and ``report`` says how it was made.
    Inputs are checked against the captured signature (count, dtype, static sizes).

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
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.signature = signature
        self.report = report
        self.device = device
        self._runner = runner

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> OptimizedModule:
        # nn.Module's .half()/.to()/.cuda() convert the weights one by one behind the
        # lowered runner's back (an ONNX Runtime session, int8 kernels): find out what ``fn``
        # would do on an empty tensor of each kind held here, and refuse any change.
        # The module's device, not the tensors': an ONNX Runtime module keeps meta tensors.
        home = self.device or torch.device("cpu")
        kinds = {(t.dtype, home) for t in [*self.graph_module.buffers(), *self.graph_module.parameters()]}
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
        return OptimizedModule(copy.deepcopy(self.graph_module, memo), copy.deepcopy(self.signature, memo),
                               copy.deepcopy(self.report, memo), self._runner, self.device)

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
