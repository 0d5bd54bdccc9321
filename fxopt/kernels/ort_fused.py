"""Fused transformer ops that ONNX Runtime runs as its ``com.microsoft`` contrib operators.

The ORT lowerings (:mod:`fxopt.lowering.ort_attention`, :mod:`fxopt.lowering.ort_skip_layer_norm`,
:mod:`fxopt.lowering.ort_bias_gelu`) write these ops into a graph bound for ONNX; each has an
eager reference implementation made of the ATen ops it replaces (so the lowered graph still
runs, and is checked, in PyTorch), a fake implementation for shapes, and an onnxscript
translation into the contrib op:

    multi_head_attention(q, k, v, mask, num_heads, scale)   -> com.microsoft.MultiHeadAttention
    attention(x, W, b, mask, num_heads, scale, qkv_sizes)    -> com.microsoft.Attention (packed Q/K/V)
    skip_layer_norm(x, skip, gamma, beta, bias, eps)         -> com.microsoft.SkipLayerNormalization
    bias_gelu(x, bias, approximate)                          -> com.microsoft.BiasGelu ('none')
                                                                com.microsoft.FastGelu ('tanh')

``q``, ``k``, ``v`` are ``[batch, seq, heads * head_size]``: the layout the projections produce,
so the head split and merge transposes disappear from the exported graph. BiasGelu is the
exact erf GELU; FastGelu is the tanh formula (``approximate='tanh'``; the built-in lowering
writes the exact form only).
"""

from __future__ import annotations

import functools

import torch

from fxopt.cost import register_flops
from fxopt.ir import numel_hint, shape_of, size_hint

__all__ = [
    "attention", "attention_onnx", "bias_gelu", "bias_gelu_onnx", "multi_head_attention", "multi_head_attention_onnx",
    "skip_layer_norm", "skip_layer_norm_onnx",
]


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, S, N*H]`` -> ``[B, N, S, H]``."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)


@torch.library.custom_op("fxopt::multi_head_attention", mutates_args=())
def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` on ``[B, S, N*H]`` projections, returned as
    ``[B, S, N*Hv]``; ``mask`` is SDPA's ``attn_mask`` (bool: True attends; float: added)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        _heads(query, num_heads), _heads(key, num_heads), _heads(value, num_heads),
        attn_mask=mask, scale=scale)
    return out.transpose(1, 2).flatten(2)


@multi_head_attention.register_fake
def _multi_head_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    torch._check(query.shape[-1] % num_heads == 0, lambda: "query width is not a multiple of num_heads")
    torch._check(key.shape[-1] == query.shape[-1], lambda: "query and key widths differ")
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _attention_flops(node: torch.fx.Node) -> int:
    q, k = shape_of(node.args[0]), shape_of(node.args[1])
    v = shape_of(node.args[2])
    if q is None or k is None or v is None:
        return 0
    return 2 * numel_hint(q) * size_hint(k[1]) + 2 * numel_hint(q[:-1]) * size_hint(k[1]) * size_hint(v[-1])


register_flops(multi_head_attention._opoverload, _attention_flops)


@torch.library.custom_op("fxopt::attention", mutates_args=())
def attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    num_heads: int,
    scale: float,
    qkv_sizes: list[int],
) -> torch.Tensor:
    """The packed Q/K/V projection ``x @ weight + bias`` (``weight`` is ``[in, q+k+v]``),
    split into ``qkv_sizes``, then :func:`multi_head_attention`."""
    qkv = torch.nn.functional.linear(x, weight.t(), bias)
    query, key, value = qkv.split(qkv_sizes, dim=-1)
    return multi_head_attention(query, key, value, mask, num_heads, scale)


@attention.register_fake
def _attention_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                    num_heads: int, scale: float, qkv_sizes: list[int]) -> torch.Tensor:
    torch._check(x.shape[-1] == weight.shape[0], lambda: "x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], qkv_sizes[2]))


def _packed_attention_flops(node: torch.fx.Node) -> int:
    x, weight = shape_of(node.args[0]), shape_of(node.args[1])
    sizes = node.args[6]
    if x is None or weight is None:
        return 0
    rows, seq = numel_hint(x[:-1]), size_hint(x[1])
    return 2 * rows * size_hint(weight[0]) * size_hint(weight[1]) + 2 * rows * seq * (sizes[0] + sizes[2])


register_flops(attention._opoverload, _packed_attention_flops)


@torch.library.custom_op("fxopt::skip_layer_norm", mutates_args=())
def skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``layer_norm((x + bias) + skip)`` over the last axis, in the order the graph added them."""
    total = (x + bias if bias is not None else x) + skip
    return torch.nn.functional.layer_norm(total, (total.shape[-1],), gamma, beta, eps)


@skip_layer_norm.register_fake
def _skip_layer_norm_fake(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor,
                          beta: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("fxopt::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """``gelu(x + bias, approximate=approximate)``."""
    return torch.nn.functional.gelu(x + bias, approximate=approximate)


@bias_gelu.register_fake
def _bias_gelu_fake(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return torch.empty_like(x)


# ---------------------------------------------------------------- ONNX translations


# The contrib ops' signatures, as ONNX Runtime declares them (the parts fxopt uses). They are
# handed to onnxscript directly and never registered with onnx.defs: the checker then treats
# the com.microsoft nodes as the external ops they are.
_CONTRIB_OPS: dict[str, tuple[list[str], list[str], dict[str, str]]] = {
    # name: (inputs, "?" suffix = optional; outputs; attributes)
    "Attention": (
        ["input", "weights", "bias?", "mask_index?", "past?", "attention_bias?"],
        ["output"], {"num_heads": "INT", "scale": "FLOAT", "qkv_hidden_sizes": "INTS"}),
    "MultiHeadAttention": (
        ["query", "key?", "value?", "bias?", "key_padding_mask?", "attention_bias?"],
        ["output"], {"num_heads": "INT", "scale": "FLOAT"}),
    "SkipLayerNormalization": (
        ["input", "skip", "gamma", "beta?", "bias?"], ["output"], {"epsilon": "FLOAT"}),
    "BiasGelu": (["A", "B"], ["C"], {}),
    "FastGelu": (["X", "bias?"], ["Y"], {}),
}


@functools.cache
def _contrib(name: str):  # type: ignore[no-untyped-def]
    """An onnxscript op for ONNX Runtime's ``com.microsoft`` ``name``."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    inputs, outputs, attributes = _CONTRIB_OPS[name]
    optional, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single

    def parameter(spec: str) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(spec.rstrip("?"), "T", param_option=optional if spec.endswith("?") else single)

    schema = OpSchema(
        name, "com.microsoft", 1,
        inputs=[parameter(spec) for spec in inputs],
        outputs=[parameter(spec) for spec in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute(attr, getattr(OpSchema.AttrType, kind), "", required=False)
                    for attr, kind in attributes.items()],
    )
    return Op(Opset("com.microsoft", 1), name, schema)


def multi_head_attention_onnx(query, key, value, mask=None, num_heads: int = 1, scale: float = 1.0):  # type: ignore[no-untyped-def]
    out = _contrib("MultiHeadAttention")(query, key, value, None, None, _attention_bias(mask, query),
                                         num_heads=num_heads, scale=scale)
    return _zero_fully_masked_rows(out, mask, num_heads)


_BOOL = 9  # onnx.TensorProto.BOOL


def _attention_bias(mask, like):  # type: ignore[no-untyped-def]
    """SDPA's ``attn_mask`` as the additive bias the contrib ops take."""
    from onnxscript import opset20 as op

    if mask is None:
        return None
    if mask.dtype == _BOOL:
        # 0 where SDPA attends, the lowest finite value elsewhere: a masked key's weight
        # is exp(lowest - max) = 0 as with SDPA's -inf, and a row with every key masked
        # stays finite (-inf would make it NaN) for _zero_fully_masked_rows to clear.
        zero = op.CastLike(op.Constant(value_float=0.0), like)
        lowest = op.CastLike(op.Constant(value_float=float(torch.finfo(torch.float32).min)), like)
        return op.Where(mask, zero, lowest)
    return op.CastLike(mask, like)


def _zero_fully_masked_rows(out, mask, num_heads: int):  # type: ignore[no-untyped-def]
    """SDPA returns 0 for a query whose boolean mask attends to no key (a fully padded row of
    a batch); the contrib ops would average the values there. ``out`` is ``[B, S, N*Hv]``,
    ``mask`` ``[B|1, N|1, S, T]``."""
    from onnxscript import opset20 as op

    if mask is None or mask.dtype != _BOOL:
        return out  # a float mask is added as it is, by SDPA and the contrib ops alike
    attends = op.ReduceMax(op.CastLike(mask, out), op.Constant(value_ints=[-1]), keepdims=1)  # [B|1, N|1, S, 1]
    attends = op.Transpose(attends, perm=[0, 2, 1, 3])  # [B|1, S, N|1, 1]
    heads = op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, -1]))  # [B, S, N, Hv]
    return op.Reshape(op.Mul(heads, attends), op.Constant(value_ints=[0, 0, -1]))


def attention_onnx(x, weight, bias, mask=None, num_heads: int = 1, scale: float = 1.0,  # type: ignore[no-untyped-def]
                   qkv_sizes=None):
    sizes = list(qkv_sizes) if qkv_sizes is not None else None
    hidden_sizes = sizes if sizes is not None and len(set(sizes)) > 1 else None
    out = _contrib("Attention")(x, weight, bias, None, None, _attention_bias(mask, x),
                                num_heads=num_heads, scale=scale, qkv_hidden_sizes=hidden_sizes)
    return _zero_fully_masked_rows(out, mask, num_heads)


def skip_layer_norm_onnx(x, skip, gamma, beta=None, bias=None, eps: float = 1e-5):  # type: ignore[no-untyped-def]
    return _contrib("SkipLayerNormalization")(x, skip, gamma, beta, bias, epsilon=eps)


def bias_gelu_onnx(x, bias, approximate: str = "none"):  # type: ignore[no-untyped-def]
    if approximate == "tanh":
        return _contrib("FastGelu")(x, bias)
    return _contrib("BiasGelu")(x, bias)
