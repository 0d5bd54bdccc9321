"""Int8 Linears on oneDNN's fused int8 kernel, for the eager CPU backend.

    int8_linear(x, Wq, sw, b, s)            =>  qlinear_pointwise(u8(x, s), s, 128, pack(Wq), sw, 0, b, "none")
    int8_linear_static_uint8(x, Wq, sw, b, s, zp)  =>  the same with u8(x, s, zp) and zero point zp
    int8_linear(x, Wq, sw, b, s) -> act     =>  qlinear_pointwise(u8(x, s), s, 128, pack(Wq), sw, 0, b, act)
        act in relu, gelu (exact or tanh), silu, tanh, hardswish
    ... -> int8_linear(y, Wq2, sw2, b2, s2)  =>  the producer writes u8(y, s2) itself (output_scale s2,
        output_zero_point 128) and the consumer reads it: one quantization pass less
    int8_linear(x, Wq, sw, b, None)         =>  token_qlinear(x, pack(Wq), sw, b): x quantized per token
        (int8, shifted into uint8 by flipping its sign bit), qlinear_pointwise(u8, 1, 128, pack(Wq), sw)
        in float32, then each row times its scale, plus b, in place (dynamic per-token activations)
    int8_linear_dynamic_tensor(x, Wq, sw, b) [-> act]  =>  tensor_qlinear(x, pack(Wq), sw, b, act): x's
        uint8 scale and zero point computed at run time, then qlinear_pointwise with them (+ the post-op)

where ``u8(x, s) = clamp(round(x / s) + 128, 0, 255)``: the symmetric int8 activations of the
QDQ graph shifted by 128, the same integers on oneDNN's fast u8 x s8 VNNI/AMX path (its s8 x s8
path is orders of magnitude slower), and ``pack(Wq)`` is ``onednn.qlinear_prepack``, done once
here (asymmetric static activations, ``fxopt::int8_linear_static_uint8``, are uint8 already and
keep their own zero point). Constraints: ``fxopt::int8_linear`` with a static (calibrated) or per-token input scale,
or ``fxopt::int8_linear_dynamic_tensor``, float32
activations, constant int8 weights, float32 scales and bias; an activation is fused when it is
the Linear's only user, the scale is per tensor and this build's kernel accepts it as a post-op; a Linear writes uint8
only when every user of its (activated) output is a static int8 Linear with one scale and zero point.

This is how PT2E's x86 Inductor lowering runs static int8 Linears; here it runs eagerly. The
kernel differs from the QDQ graph only by float rounding (and, when it writes uint8, by one
quantization step where the float output sits on a rounding boundary), which the backend
checks on the example inputs before it keeps the lowered graph. A probe, run once, checks that
the ops exist on this PyTorch build and give correct numbers; without them the graph keeps
``fxopt::int8_linear``. With a ``choose`` (a measured choice, :mod:`fxopt.pipeline.timings`)
a Linear is lowered only when oneDNN's kernel (quantization included) measures faster than
fxopt's own int8 kernel (``torch._int_mm``; per tensor, ``quantized::linear_dynamic``) at its shapes, at the example batch size and a second one when the
batch is dynamic.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import arg, constant, derived, dtype_of, is_op, ops, shape_of
from fxopt.kernels import int8 as kernels
from fxopt.latency import Deferred
from fxopt.lowering.base import (
    Choose,
    Lowering,
    LoweringResult,
    hold_packed,
    measured_inputs,
    measured_shapes,
    weights_held_once,
)
from fxopt.quant import dynamic_tensor_qparams_values, quantize_per_token

aten = torch.ops.aten

# The uint8 zero point of symmetric int8 activations shifted into uint8.
ZERO_POINT = 128


def _gelu(node: fx.Node) -> tuple[str, str] | None:
    approximate = arg(node, 1, "approximate", "none")
    return ("gelu", approximate) if approximate in ("none", "tanh") else None


# Each activation spelled as a oneDNN int8 post-op: (name, algorithm), from the node's arguments.
POST_OPS: dict[Any, Any] = {
    ops.relu: lambda node: ("relu", ""),
    ops.gelu: _gelu,
    ops.silu: lambda node: ("swish", ""),
    ops.tanh: lambda node: ("tanh", ""),
    ops.hardswish: lambda node: ("hardswish", ""),
}
_REFERENCE = {
    "none": lambda y: y,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "swish": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "hardswish": torch.nn.functional.hardswish,
}


def _qlinear() -> Any:
    return torch.ops.onednn.qlinear_pointwise.default


def _prepack() -> Any:
    return torch.ops.onednn.qlinear_prepack.default


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int = ZERO_POINT) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, 0, 255)`` as uint8, in one native pass (read on the
    quantized tensor's own memory, :func:`fxopt.kernels.int8.integer_view`)."""
    return kernels.integer_view(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8))


def token_qlinear(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero_points: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``fxopt::int8_linear`` with per-token activations on oneDNN's int8 kernel: the same int8
    activations (:func:`fxopt.quant.quantize_per_token`) as uint8 with zero point 128 (flipping
    the sign bit adds 128 to an int8), the weight prepacked, its scale applied by the kernel; the
    row scales and the bias in one pass over the output, in place."""
    rows = x.reshape(-1, x.shape[-1])
    xq, row_scale = quantize_per_token(rows)
    out = _qlinear()(xq.view(torch.uint8).bitwise_xor_(128), 1.0, ZERO_POINT, packed, weight_scale, zero_points,
                     None, 1.0, 0, torch.float32, "none", [], "")
    out = out.mul_(row_scale) if bias is None else torch.addcmul(bias, out, row_scale, out=out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def tensor_qlinear(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero_points: torch.Tensor,
                   bias: torch.Tensor | None, post_op: str = "none", algorithm: str = "") -> torch.Tensor:
    """``fxopt::int8_linear_dynamic_tensor`` (+ an activation) on oneDNN's int8 kernel: ``x``
    quantized to uint8 with the scale and zero point of all of it
    (:func:`fxopt.quant.dynamic_tensor_qparams`), the weight prepacked, scales, bias and the
    activation applied by the kernel."""
    rows = x.reshape(-1, x.shape[-1])
    scale_value, zero_point_value = dynamic_tensor_qparams_values(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xq = quantize_u8(rows, scale_value, zero_point_value)
    out = _qlinear()(xq, scale_value, zero_point_value, packed, weight_scale, zero_points, bias,
                     1.0, 0, torch.float32, post_op, [], algorithm)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@functools.cache
def qlinear_unsupported_reason() -> str | None:
    """Why this PyTorch build cannot run static int8 Linears on ``onednn.qlinear_pointwise``
    (None: it can). Checks, on a small probe, float and uint8 outputs against the integer
    arithmetic they stand for."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    try:
        kernel, prepack = _qlinear(), _prepack()
    except (AttributeError, RuntimeError):
        return "this PyTorch build has no onednn.qlinear_pointwise / qlinear_prepack kernels"
    qweight = torch.arange(-96, 96, dtype=torch.int8).reshape(12, 16)
    weight_scale = torch.linspace(0.01, 0.02, 12)
    bias = torch.linspace(-1, 1, 12)
    x = torch.linspace(-3, 3, 8 * 16).reshape(8, 16)
    scale = 3.0 / 127
    try:
        with warnings.catch_warnings():
            # Quantized tensor types are deprecated upstream; their quantize kernel is not.
            warnings.simplefilter("ignore")
            xq = quantize_u8(x, scale)
        packed = prepack(qweight, None)
        got = kernel(xq, scale, ZERO_POINT, packed, weight_scale, torch.zeros(12, dtype=torch.int64), bias,
                     1.0, 0, torch.float32, "none", [], "")
        got_u8 = kernel(xq, scale, ZERO_POINT, packed, weight_scale, torch.zeros(12, dtype=torch.int64), bias,
                        0.05, ZERO_POINT, torch.uint8, "relu", [], "")
    except Exception as exc:  # missing kernel, changed signature
        return f"onednn.qlinear_pointwise failed a probe: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    integers = torch.round(x / scale).clamp(-128, 127)
    if not torch.equal(xq.int() - ZERO_POINT, integers.int()):
        return "torch.quantize_per_tensor disagreed with round(x / scale) on a probe"
    want = (integers.double() @ qweight.double().t()) * (scale * weight_scale.double()) + bias.double()
    if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4):
        return "onednn.qlinear_pointwise disagreed with the integer arithmetic on a probe"
    want_u8 = torch.round(torch.relu(want) / 0.05).add(ZERO_POINT).clamp(0, 255)
    if got_u8.dtype != torch.uint8 or (got_u8.double() - want_u8).abs().max() > 1:
        return "onednn.qlinear_pointwise's uint8 output disagreed with the integer arithmetic on a probe"
    return None


@functools.cache
def supported_post_ops() -> frozenset[str]:
    """The post-ops this build's int8 kernel fuses and computes right."""
    if qlinear_unsupported_reason() is not None:
        return frozenset()
    qweight = torch.arange(-64, 64, dtype=torch.int8).reshape(8, 16)
    weight_scale, bias = torch.full((8,), 0.01), torch.linspace(-1, 1, 8)
    x = torch.linspace(-2, 2, 4 * 16).reshape(4, 16)
    scale = 2.0 / 127
    xq = quantize_u8(x, scale)
    packed = _prepack()(qweight, None)
    plain = (xq.double() - ZERO_POINT) @ qweight.double().t() * (scale * 0.01) + bias.double()
    found = set()
    for name, reference in _REFERENCE.items():
        if name == "none":
            continue
        for algorithm in (["none", "tanh"] if name == "gelu" else [""]):
            try:
                got = _qlinear()(xq, scale, ZERO_POINT, packed, weight_scale, torch.zeros(8, dtype=torch.int64),
                                 bias, 1.0, 0, torch.float32, name, [], algorithm)
            except Exception:  # this build does not fuse it
                continue
            want = reference(plain) if algorithm != "tanh" else torch.nn.functional.gelu(plain, approximate="tanh")
            if torch.allclose(got.double(), want, rtol=1e-3, atol=1e-3):
                found.add(f"{name}:{algorithm}" if name == "gelu" else name)
    return frozenset(found)


def kernel_unsupported_reason(device: torch.device) -> str | None:
    """The probe a test can stand in for (looked up on the module at call time)."""
    return qlinear_unsupported_reason()


class OneDnnQLinear(Lowering):
    """Static and dynamic per-tensor int8 Linears (+ a following activation) and per-token ones
    -> oneDNN's fused int8 kernel, on CPU."""

    name = "onednn-qlinear"
    backends = ("eager",)
    devices = ("cpu",)
    # A CPU kernel choice: opt.graph_module keeps fxopt::int8_linear (and stays exportable).
    stage = "kernel"
    after = ("int8-linear",)  # packs the int8 kernels int8-linear wrote
    # Float rounding in the fused activation moves a uint8 output across a rounding boundary
    # now and then (one quantization step); see Int8Linear.parity_rtol.
    parity_rtol = 0.05
    measured = True

    def probe(self, device: torch.device) -> str | None:
        return kernel_unsupported_reason(device)

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(_static_linear(gm, node) or _dynamic_linear(gm, node) for node in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None, choose: Choose | None = None) -> LoweringResult:
        return lower_static_int8_linears(gm, choose)


STATIC_OPS = (kernels.int8_linear_op, kernels.int8_linear_static_uint8_op)


def _qparams(node: fx.Node) -> tuple[float, int]:
    """The uint8 scale and zero point ``node`` quantizes its input with."""
    if is_op(node, kernels.int8_linear_static_uint8_op):
        return float(node.args[4]), int(node.args[5])
    return float(node.args[4]), ZERO_POINT


def _static_linear(gm: fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` is an int8 Linear with a static scale this kernel can run."""
    if not is_op(node, *STATIC_OPS) or not isinstance(node.args[0], fx.Node):
        return False
    return isinstance(node.args[4] if len(node.args) > 4 else None, float) and _operands_fit(gm, node)


def _token_linear(gm: fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` is an int8 Linear with per-token activations this kernel can run."""
    if not is_op(node, kernels.int8_linear_op) or not isinstance(node.args[0], fx.Node):
        return False
    return (node.args[4] if len(node.args) > 4 else None) is None and _operands_fit(gm, node)


def _dynamic_linear(gm: fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` is an int8 Linear with dynamic (per-token or per-tensor) activations
    this kernel can run."""
    if is_op(node, kernels.int8_linear_dynamic_tensor_op) and isinstance(node.args[0], fx.Node):
        # a Linear the int8 lowering measured fastest on a named engine stays on it
        engine = node.args[4] if len(node.args) > 4 else node.kwargs.get("engine", "")
        return not engine and _operands_fit(gm, node)
    return _token_linear(gm, node)


def _dynamic_post_op(gm: fx.GraphModule, node: fx.Node, post_ops: frozenset[str]) -> tuple[tuple[str, str], fx.Node]:
    """Per tensor, the kernel applies the activation after the whole rescale: it fuses one;
    per token the row scales come after the kernel, so none."""
    if _token_linear(gm, node):
        return ("none", ""), node
    return _post_op(node, post_ops)


def _operands_fit(gm: fx.GraphModule, node: fx.Node) -> bool:
    """float32 activations, a constant 2-D int8 weight, float32 weight scales and bias."""
    x, qweight, weight_scale = node.args[:3]
    bias = node.args[3] if len(node.args) > 3 else None
    if dtype_of(x) != torch.float32:
        return False
    qw, ws = constant(gm, qweight), constant(gm, weight_scale)
    if qw is None or ws is None or qw.dtype != torch.int8 or qw.dim() != 2 or ws.dtype != torch.float32:
        return False
    return bias is None or (constant(gm, bias) is not None and constant(gm, bias).dtype == torch.float32)


def _post_op(node: fx.Node, post_ops: frozenset[str]) -> tuple[tuple[str, str], fx.Node]:
    """The activation fused into ``node``'s kernel (("none", "") if none) and the node whose
    value the kernel computes."""
    users = list(node.users)
    if len(users) == 1 and users[0].target in POST_OPS and users[0].args[0] is node:
        spelled = POST_OPS[users[0].target](users[0])
        key = None if spelled is None else (f"{spelled[0]}:{spelled[1]}" if spelled[0] == "gelu" else spelled[0])
        if key in post_ops:
            return spelled, users[0]
    return ("none", ""), node


def lower_static_int8_linears(gm: fx.GraphModule, choose: Choose | None = None) -> LoweringResult:
    """Rewrite every static and per-token ``fxopt::int8_linear`` of ``gm`` (in place) into
    ``onednn.qlinear_pointwise`` (with ``choose``, those where it measures faster)."""
    result = LoweringResult()
    post_ops = supported_post_ops()
    linears = [n for n in gm.graph.nodes if _static_linear(gm, n)]
    dynamic = [n for n in gm.graph.nodes if _dynamic_linear(gm, n)]
    if choose is not None:
        kept = [n for n in linears if _measured_faster(gm, n, _post_op(n, post_ops), choose, result)]
        kept_dynamic = [n for n in dynamic
                        if _measured_faster(gm, n, _dynamic_post_op(gm, n, post_ops), choose, result)]
        slower = len(linears) + len(dynamic) - len(kept) - len(kept_dynamic)
        if slower:
            result.notes.append(f"{slower} int8 Linear(s) keep fxopt's int8 kernel: "
                                "oneDNN's measured no faster at their shapes")
        linears, dynamic = kept, kept_dynamic
    _lower_dynamic(gm, dynamic, post_ops, result)
    if not linears:
        if dynamic:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return result
    lowered_set = set(linears)
    quantized: dict[tuple[fx.Node, float, int], fx.Node] = {}  # (value, scale, zero point) -> its uint8 node
    fused: dict[str, int] = {}
    chained = 0
    for node in linears:
        x, qweight, weight_scale, bias = node.args[:4]
        input_scale, input_zero_point = _qparams(node)
        post_op, out = _post_op(node, post_ops)
        # The value every reader quantizes with one scale: write it in uint8 directly.
        readers = list(out.users)
        output_scale, output_zero_point, output_dtype = 1.0, 0, torch.float32
        if readers and all(r in lowered_set and r.args[0] is out for r in readers) \
                and len({_qparams(r) for r in readers}) == 1:
            (output_scale, output_zero_point), output_dtype = _qparams(readers[0]), torch.uint8
        source = quantized.get((x, input_scale, input_zero_point))
        with gm.graph.inserting_before(out):
            if source is None:
                source = gm.graph.call_function(quantize_u8, (x, input_scale, input_zero_point))
                quantized[(x, input_scale, input_zero_point)] = source
            packed = _packed_weight(gm, qweight, result)
            zeros = gm.graph.get_attr(_zero_points(gm, constant(gm, qweight).shape[0]))
            kernel = gm.graph.call_function(_qlinear(), (
                source, input_scale, input_zero_point, packed, weight_scale, zeros, bias,
                output_scale, output_zero_point, output_dtype,
                post_op[0], [], post_op[1]))
        kernel.meta.update(out.meta)
        if output_dtype == torch.uint8:
            kernel.meta.pop("val", None)  # a uint8 value now, read only by the kernels below
            # The readers find it as their quantized input, under the scale they quantize with.
            quantized[(kernel, output_scale, output_zero_point)] = kernel
            for reader in readers:
                reader.replace_input_with(out, kernel)
            chained += 1
        out.replace_all_uses_with(kernel)
        if out is not node:
            gm.graph.erase_node(out)
        gm.graph.erase_node(node)
        fused[post_op[0]] = fused.get(post_op[0], 0) + 1
        result.lowered += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    spelled = ", ".join(f"{count} {'plain' if name == 'none' else '+' + name}" for name, count in sorted(fused.items()))
    note = f"{result.lowered} static int8 Linear(s) run on onednn.qlinear_pointwise ({spelled})"
    if chained:
        note += f"; {chained} write uint8 for the int8 Linear(s) that read them"
    result.notes.append(note)
    return result


def _lower_dynamic(gm: fx.GraphModule, nodes: list[fx.Node], post_ops: frozenset[str],
                   result: LoweringResult) -> None:
    counts: dict[str, int] = {}
    for node in nodes:
        x, qweight, weight_scale, bias = node.args[:4]
        per_token = _token_linear(gm, node)
        (post_name, algorithm), out = _dynamic_post_op(gm, node, post_ops)
        with gm.graph.inserting_before(out):
            packed = _packed_weight(gm, qweight, result)
            zeros = gm.graph.get_attr(_zero_points(gm, constant(gm, qweight).shape[0]))
            kernel = gm.graph.call_function(token_qlinear, (x, packed, weight_scale, zeros, bias)) if per_token \
                else gm.graph.call_function(tensor_qlinear, (x, packed, weight_scale, zeros, bias, post_name, algorithm))
        kernel.meta.update(out.meta)
        out.replace_all_uses_with(kernel)
        if out is not node:
            gm.graph.erase_node(out)
        gm.graph.erase_node(node)
        kind = "per-token" if per_token else "per-tensor" + ("" if post_name == "none" else f" +{post_name}")
        counts[kind] = counts.get(kind, 0) + 1
        result.lowered += 1
    if nodes:
        spelled = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
        result.notes.append(f"{len(nodes)} dynamic int8 Linear(s) run on onednn.qlinear_pointwise ({spelled})")


def _measured_faster(gm: fx.GraphModule, node: fx.Node, post: tuple[tuple[str, str], fx.Node],
                     choose: Choose, result: LoweringResult) -> bool:
    """Whether oneDNN's kernel, quantizing its float input, is faster than ``node`` (+ the
    fused activation) at ``node``'s shapes, as ``choose`` measured it; the choice goes in
    ``result.choices``. (A kernel that would also write uint8 for the next one saves that
    one's quantization besides: not counted, so the verdict errs toward what runs now.)"""
    (post_name, algorithm), out = post
    qweight, weight_scale = constant(gm, node.args[1]), constant(gm, node.args[2])
    bias = constant(gm, node.args[3]) if len(node.args) > 3 and node.args[3] is not None else None
    per_token, per_tensor = _token_linear(gm, node), is_op(node, kernels.int8_linear_dynamic_tensor_op)
    input_scale, input_zero_point = (None, None) if per_token or per_tensor else _qparams(node)
    zeros = torch.zeros(qweight.shape[0], dtype=torch.int64)
    rest = [constant(gm, a) if isinstance(a, fx.Node) else a for a in node.args[1:]]

    def onednn_kernel() -> Any:  # the weight packed only where the choice is measured, not cached
        packed = _prepack()(qweight, None)

        def onednn(x: torch.Tensor) -> torch.Tensor:
            if per_token:
                return token_qlinear(x, packed, weight_scale, zeros, bias)
            if per_tensor:
                return tensor_qlinear(x, packed, weight_scale, zeros, bias, post_name, algorithm)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                xq = quantize_u8(x, input_scale, input_zero_point)
            return _qlinear()(xq, input_scale, input_zero_point, packed, weight_scale, zeros, bias,
                              1.0, 0, torch.float32, post_name, [], algorithm)
        return onednn

    def int8_linear(x: torch.Tensor) -> torch.Tensor:
        y = node.target(x, *rest)
        return y if out is node else out.target(y, *out.args[1:], **out.kwargs)

    shapes = measured_shapes(shape_of(node.args[0]))
    site = (f"x={'/'.join(map(str, shapes))} w={tuple(qweight.shape)} bias={bias is not None} "
            f"zero_point={input_zero_point} post={post_name}:{algorithm}"
            + (" per-token" if per_token else " dynamic-tensor" if per_tensor else ""))
    inputs = measured_inputs(shapes, torch.float32)
    choice = choose("onednn-qlinear", site, {"onednn-qlinear": Deferred(onednn_kernel), "int8-linear": int8_linear}, inputs,
                    prefer="int8-linear")
    name = choice.name
    engine = node.args[4] if per_tensor and len(node.args) > 4 else ""
    if (name == "int8-linear" and per_tensor and kernels.holds_weight_twice(str(engine))
            and (weights_held_once() or kernels.close_enough(choice.times.get("onednn-qlinear", []),
                                                             choice.times.get("int8-linear", [])))):
        name = "onednn-qlinear"  # its pack holds the weight once; the engine's, twice
    result.choices.append({**choice.as_dict(), "chosen": name, "nodes": [node.name]})
    return name == "onednn-qlinear"


def _packed_weight(gm: fx.GraphModule, node: fx.Node, result: LoweringResult) -> fx.Node:
    """``node``'s int8 weight packed for oneDNN, as a ``get_attr`` of the packed tensor."""
    qweight = constant(gm, node)
    # derived(): the graphs of one model (a causal LM's prefill, decode) share one packed copy.
    packed = derived([qweight], ("onednn-qlinear-pack",), lambda: _prepack()(qweight, None))
    return hold_packed(gm, node, packed, _unpacked, result, "onednn")


def _unpacked(packed: torch.Tensor) -> torch.Tensor:
    """The plain int8 weight ``[out, in]`` of a ``qlinear_prepack``ed one (it reads back as its
    transpose)."""
    return packed.to_dense().t().contiguous()


def _zero_points(gm: fx.GraphModule, channels: int) -> str:
    name = f"_onednn_zero_points_{channels}"
    if not hasattr(gm, name):
        gm.register_buffer(name, torch.zeros(channels, dtype=torch.int64))
    return name
