"""The weight-only Linear lowering: ``fxopt::weight_only_linear`` -> the fastest measured kernel.

    weight_only_linear(x, q, s, z, b, bits, dtype)
      => weight_only_linear_packed(x, pack(q, s, z), b, kernel, ...)   kernel measured fastest
      => kernel_op(x, pack(q, s, z)) (+ b)      the same, where the kernel has an op of its own
                                                 and x and dtype are float32 (fxopt's GEMV)
      => weight_only_linear(...) as it is (dequantize + F.linear)      when that is fastest

For each Linear shape (out and in features, bits, group, compute dtype, the example's rows) the
candidates that this torch build and device have (:data:`fxopt.kernels.weight_only.PACKED_KERNELS`)
are packed, checked against the dequantizing reference on a random input, and timed side by
side with it by the compile's measured choice (:class:`fxopt.pipeline.timings.KernelTimings`,
the project's one timing loop and its on-disk cache) at one row (a decode step) and at the
example's rows: the first packed kernel stands unless another candidate is faster by
:data:`REFERENCE_MARGIN` at both. A kernel stage: ``opt.graph_module`` keeps the portable op, whose
int8 constants are what ``fxopt.save`` writes; the packed layouts are made here, per machine.

ONNX: the ``weight-only-matmul-nbits`` lowering (:mod:`fxopt.lowering.weight_only_onnx`) writes
ONNX Runtime's ``com.microsoft.MatMulNBits`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import add_constant, constant, derived, is_op, numel_hint, shape_of
from fxopt.kernels import weight_only as kernels
from fxopt.lowering.base import Choose, Lowering, LoweringResult
from fxopt.verify import compare_outputs

REFERENCE = "dequantize"
# The timing loop runs one Linear over and over, its weight hot in cache; in a model each
# weight comes from memory once per call, where the packed kernels read 2-8x fewer bytes. So
# another candidate must measure this much (a fraction) faster than the first packed kernel.
REFERENCE_MARGIN = 0.1
# bfloat16 GEMMs of two kernels round their outputs up to a bfloat16 step apart in each layer.
PARITY_RTOL = {torch.bfloat16: 0.05, torch.float16: 0.05, torch.float32: 1e-3}


class WeightOnlyLinear(Lowering):
    """Weight-only Linears of the quantize-weights pass -> packed library kernels."""

    name = "weight-only-linear"
    backends = ("eager",)
    devices = ("cpu", "cuda")
    stage = "kernel"

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(is_op(n, kernels.weight_only_linear_op) for n in gm.graph.nodes)

    measured = True

    def lower(self, gm: fx.GraphModule, device: torch.device | None, choose: Choose | None = None) -> LoweringResult:
        result = LoweringResult()
        chosen: dict[str, int] = {}
        # Linears of one shape (a transformer's layers) share their choice: the candidates are
        # packed, checked and timed (or looked up) once per shape and compile, not per Linear.
        by_shape: dict[tuple[Any, ...], str] = {}
        for node in list(gm.graph.nodes):
            if not is_op(node, kernels.weight_only_linear_op):
                continue
            x, q_node, s_node, z_node, bias, bits, dtype = node.args
            q, scale = constant(gm, q_node), constant(gm, s_node)
            zero = None if z_node is None else constant(gm, z_node)
            x_shape = shape_of(x)
            rows = numel_hint(x_shape[:-1]) if x_shape else 1
            shape = (tuple(q.shape), tuple(scale.shape), zero is not None, bits, dtype, rows)
            if shape not in by_shape:
                by_shape[shape] = choose_kernel(device, q, scale, zero, bits, dtype, rows, choose)
            name = by_shape[shape]
            chosen[name] = chosen.get(name, 0) + 1
            if name == REFERENCE:
                continue
            kernel = kernels.PACKED_KERNELS[name]
            sources = (q.to(device), scale.to(device), None if zero is None else zero.to(device))
            # One packed copy per weight, shared by the graphs that share the model's weights.
            packed, qparams = derived(sources, ("weight-only-pack", name, dtype),
                                      lambda kernel=kernel, sources=sources, dtype=dtype: kernel.pack(*sources, dtype))
            hint = str(q_node.target)
            packed_node = add_constant(gm, packed, f"{hint}_{name}", before=node)
            qparams_node = add_constant(gm, qparams, f"{hint}_{name}_qparams", before=node)
            group = q.shape[1] // scale.shape[1]
            with gm.graph.inserting_before(node):
                x_value = x.meta.get("val") if isinstance(x, fx.Node) else None
                if kernel.direct is not None and dtype == torch.float32 and getattr(x_value, "dtype", None) == dtype:
                    # The kernel's own op in the graph (float32 in and out: nothing to convert).
                    lowered = gm.graph.call_function(kernel.direct(), (x, packed_node, qparams_node)
                                                     + ((group,) if bits == 4 else ()))
                    if bias is not None:
                        lowered.meta.update(node.meta)
                        lowered = gm.graph.call_function(torch.ops.aten.add.Tensor, (lowered, bias))
                else:
                    lowered = gm.graph.call_function(kernels.weight_only_linear_packed_op, (
                        x, packed_node, qparams_node, bias, name, group, q.shape[0], dtype))
            lowered.meta.update(node.meta)
            node.replace_all_uses_with(lowered)
            gm.graph.erase_node(node)
            result.lowered += 1
            result.parity_rtol = max(result.parity_rtol or 0.0, PARITY_RTOL.get(dtype, 1e-3))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        result.notes.append("weight-only Linears run on " + ", ".join(
            f"{count}x {name}" for name, count in sorted(chosen.items())) + " (measured fastest per shape)")
        return result


def candidates(device: torch.device, bits: int, group_size: int, in_features: int, out_features: int,
               dtype: torch.dtype) -> list[kernels.PackedKernel]:
    """The packed kernels this torch build has for such a Linear on ``device``."""
    return [k for k in kernels.PACKED_KERNELS.values()
            if k.takes(bits, group_size, in_features, out_features, device, dtype)]


def choose_kernel(device: torch.device, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  bits: int, dtype: torch.dtype, rows: int, choose: Choose | None = None) -> str:
    """The fastest correct kernel for this Linear's shape at 1 and ``rows`` rows: a
    :data:`PACKED_KERNELS` name, or ``"dequantize"`` (the op as it is). ``choose`` is the
    compile's measured choice (:class:`fxopt.pipeline.timings.KernelTimings`: timed once per
    machine and shape, cached on disk); without it, the first packed kernel that is correct."""
    device = device or torch.device("cpu")
    q, scale = q.to(device), scale.to(device)
    zero = None if zero is None else zero.to(device)
    out_features, in_features = q.shape
    group_size = in_features // scale.shape[1]
    row_counts = sorted({1, max(rows, 1)})
    probe = torch.randn(max(row_counts), in_features, generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    with torch.no_grad():
        expected = kernels.weight_only_linear(probe, q, scale, zero, None, bits, dtype)
        for kernel in candidates(device, bits, group_size, in_features, out_features, dtype):
            try:  # shapes a kernel refuses (out features not a multiple of 16, say) raise here
                packed, qparams = kernel.pack(q, scale, zero, dtype)
                got = kernels.weight_only_linear_packed(probe, packed, qparams, None, kernel.name, group_size,
                                                        out_features, dtype)
            except RuntimeError:
                continue
            if compare_outputs([expected], [got]).within(PARITY_RTOL.get(dtype, 1e-3)):
                runs[kernel.name] = (packed, qparams)
    if not runs:
        return REFERENCE
    first = next(iter(runs))
    if choose is None:
        return first

    def call(name: str) -> Any:
        if name == REFERENCE:
            return lambda x: kernels.weight_only_linear(x, q, scale, zero, None, bits, dtype)
        packed, qparams = runs[name]
        return lambda x: kernels.weight_only_linear_packed(x, packed, qparams, None, name, group_size,
                                                           out_features, dtype)

    # The first packed kernel stands unless another (the dequantizing op included) measures
    # faster by REFERENCE_MARGIN at one row (a decode step) and at the example's rows alike.
    site = (f"w=({out_features}, {in_features}) bits={bits} group={group_size} zero={zero is not None} "
            f"{str(dtype).removeprefix('torch.')} rows={'/'.join(map(str, row_counts))} {device.type}")
    choice = choose("weight-only-linear", site, {name: call(name) for name in [*runs, REFERENCE]},
                    [[probe[:count]] for count in row_counts], prefer=first, margin=REFERENCE_MARGIN)
    return choice.name
