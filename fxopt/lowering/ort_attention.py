"""The ONNX Runtime attention lowering: SDPA on split heads -> ``fxopt::multi_head_attention``.

    sdpa(heads(q), heads(k), heads(v), mask, scale)  -> merge
      => multi_head_attention(q, k, v, mask, num_heads, scale)   (com.microsoft.MultiHeadAttention)

where ``heads(t) = transpose(view(t, [B, S, N, H]), 1, 2)`` of a ``[B, S, N*H]`` projection and
``merge`` is the ``transpose(1, 2) -> reshape [B, S, N*H]`` that follows. Queries, keys and
values that do not come in that form (rotary embeddings applied after the head split) are
brought back to ``[B, S, N*H]`` with a transpose and a flatten; an output used otherwise gets
its heads split again. The boolean mask becomes MultiHeadAttention's additive
``attention_bias`` (0 where SDPA attends, the lowest finite float elsewhere) and the output
of a query whose mask attends nowhere is zeroed, SDPA's own result; a float mask is the bias
itself.

When the three projections are the split of one Linear (the packed Q/K/V of
``merge-siblings``) that feeds nothing else, the Linear goes into the op too:

    multi_head_attention(split(linear(x, W, b)), mask, num_heads, scale)
      => attention(x, W^T, b, mask, num_heads, scale, qkv_sizes)     (com.microsoft.Attention)

Constraints: float32 (ONNX Runtime's CPU kernel), dropout 0, no ``is_causal`` flag (a causal
mask given as a tensor is fine), as many key/value heads as query heads, and a mask shaped
``[B|1, N|1, S, T]``. Anything else stays SDPA, with the refusal code in the report.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import (
    add_constant,
    arg,
    constant,
    dtype_of,
    is_op,
    ops,
    remove_unused_constants,
    shape_of,
)
from fxopt.kernels import ort_fused as kernels
from fxopt.lowering.base import Lowering, LoweringResult, OnnxTranslations
from fxopt.rewrite.refusal import Refusal

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_RESHAPES = (ops.view, ops.reshape, aten._unsafe_view.default)
_COPIES = (ops.contiguous, ops.clone)


class OrtAttention(Lowering):
    """SDPA -> ONNX Runtime's MultiHeadAttention contrib op, for the ONNX backend."""

    name = "ort-attention"
    backends = ("onnx",)
    onnx_domains = ("com.microsoft",)
    before = ("int8-linear",)  # it never touches the projections, and vice versa

    def applies(self, gm: fx.GraphModule) -> bool:
        return any(is_op(n, SDPA) for n in gm.graph.nodes)

    def lower(self, gm: fx.GraphModule, device: torch.device | None) -> LoweringResult:
        return lower_attention(gm)

    def onnx_translations(self) -> OnnxTranslations:
        return {kernels.multi_head_attention._opoverload: kernels.multi_head_attention_onnx,
                kernels.attention._opoverload: kernels.attention_onnx}


def lower_attention(gm: fx.GraphModule) -> LoweringResult:
    """Rewrite every SDPA of ``gm`` that ONNX Runtime's MultiHeadAttention computes alike."""
    result = LoweringResult()
    skipped: list[str] = []
    packed = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, SDPA):
            continue
        refusal = attention_refusal(node)
        if refusal is not None:
            skipped.append(f"'{node.name}' stays SDPA: {refusal}")
            continue
        fused = _rewrite(gm, node)
        packed += _pack_projection(gm, fused)
        result.lowered += 1
    if result.lowered:
        gm.graph.eliminate_dead_code()
        remove_unused_constants(gm)
        gm.recompile()
        if packed:
            result.notes.append(f"{packed} attention(s) with a packed Q/K/V projection run as com.microsoft.Attention")
        if result.lowered - packed:
            result.notes.append(f"{result.lowered - packed} attention(s) run as com.microsoft.MultiHeadAttention")
    result.notes.extend(skipped)
    return result


def _same(a: Any, b: Any) -> bool:
    """Two sizes known equal (symbolic sizes by their expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def attention_refusal(node: fx.Node) -> Refusal | None:
    """Why this SDPA cannot become MultiHeadAttention (None when it can)."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = arg(node, 3, "attn_mask")
    if arg(node, 4, "dropout_p", 0.0) != 0.0:
        return Refusal("dropout", f"dropout_p={arg(node, 4, 'dropout_p')}")
    if arg(node, 5, "is_causal", False):
        return Refusal("causal-flag", "is_causal=True; MultiHeadAttention's CPU kernel takes the mask as a tensor")
    shapes = [shape_of(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return Refusal("not-4d", f"query/key/value shapes {shapes}")
    if any(dtype_of(t) != torch.float32 for t in (q, k, v)):
        return Refusal("dtype", f"{dtype_of(q)}; ONNX Runtime's CPU MultiHeadAttention is float32")
    (b, n, s, h), (kb, kn, t, kh), (vb, vn, vt, _) = shapes
    if not (_same(kn, n) and _same(vn, n)):
        return Refusal("grouped-heads", f"{n} query heads, {kn}/{vn} key/value heads")
    if not (isinstance(n, int) and isinstance(h, int) and _same(kh, h)):
        return Refusal("head-size", f"heads {n}, head sizes {h}/{kh} must be static and equal")
    if not (_same(kb, b) and _same(vb, b) and _same(vt, t)):
        return Refusal("shapes", f"query {shapes[0]}, key {shapes[1]}, value {shapes[2]}")
    if mask is not None:
        mshape, mdtype = shape_of(mask), dtype_of(mask)
        if mshape is None or len(mshape) != 4:
            return Refusal("mask-shape", f"mask {mshape}; MultiHeadAttention takes [B|1, N|1, S, T]")
        mb, mn, ms, mt = mshape
        if not ((_same(mb, b) or mb == 1) and (_same(mn, n) or mn == 1) and _same(ms, s) and _same(mt, t)):
            return Refusal("mask-shape", f"mask {mshape} for scores [{b}, {n}, {s}, {t}]")
        if mdtype not in (torch.bool, torch.float32):
            return Refusal("mask-dtype", f"mask dtype {mdtype}")
    return None


def _scale(node: fx.Node) -> float:
    scale = arg(node, 6, "scale")
    head_size = shape_of(node.args[0])[-1]
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_size)


def _projection(gm: fx.GraphModule, heads: fx.Node, before: fx.Node) -> fx.Node:
    """The ``[B, S, N*H]`` tensor whose head split is ``heads`` (``[B, N, S, H]``)."""
    if _is_swap_12(heads):
        split = heads.args[0]
        if is_op(split, _RESHAPES):
            source = split.args[0]
            src, hs = shape_of(source), shape_of(heads)
            if src is not None and len(src) == 3 and _same(src[0], hs[0]) and _same(src[1], hs[2]) \
                    and src[2] == hs[1] * hs[3]:
                return source
    with gm.graph.inserting_before(before):
        swapped = gm.graph.call_function(ops.transpose, (heads, 1, 2))
        flat = gm.graph.call_function(aten.flatten.using_ints, (swapped, 2))
    for new in (swapped, flat):
        _infer(new)
    return flat


def _is_swap_12(node: Any) -> bool:
    if is_op(node, ops.transpose):
        dims = sorted(d % 4 for d in node.args[1:3])
        return dims == [1, 2]
    if is_op(node, ops.permute):
        return [d % 4 for d in node.args[1]] == [0, 2, 1, 3]
    return False


def _merged_output(node: fx.Node) -> fx.Node | None:
    """The node computing ``[B, S, N*Hv]`` from SDPA's ``[B, N, S, Hv]`` output by the usual
    transpose-and-reshape, or None."""
    out_shape = shape_of(node)
    current = node
    while True:
        if len(current.users) != 1:
            return None
        user = next(iter(current.users))
        if is_op(user, _RESHAPES + _COPIES) and shape_of(user) is not None and \
                all(_same(a, b) for a, b in zip(shape_of(user), shape_of(current))) and \
                len(shape_of(user)) == len(shape_of(current)):
            current = user  # a reshape to the same shape, or a copy: nothing moves
            continue
        break
    if not _is_swap_12(user):
        return None
    current = user
    while len(current.users) == 1 and is_op(next(iter(current.users)), _COPIES):
        current = next(iter(current.users))
    if len(current.users) != 1:
        return None
    final = next(iter(current.users))
    final_shape = shape_of(final)
    b, n, s, hv = out_shape
    if not is_op(final, _RESHAPES) or final_shape is None or len(final_shape) != 3:
        return None
    if _same(final_shape[0], b) and _same(final_shape[1], s) and final_shape[2] == n * hv:
        return final
    return None


def _infer(node: fx.Node) -> None:
    from fxopt.ir import infer_val

    infer_val(node)


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = arg(node, 3, "attn_mask")
    n, hv = shape_of(v)[1], shape_of(v)[3]
    merged = _merged_output(node)
    query, key, value = (_projection(gm, t, node) for t in (q, k, v))
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(kernels.multi_head_attention._opoverload,
                                       (query, key, value, mask, n, _scale(node)))
    fused.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ != "val"})
    _infer(fused)
    if merged is not None:
        merged.replace_all_uses_with(fused)
        # Erased by hand: dead-code elimination keeps SDPA, whose op is tagged
        # nondeterministic (its dropout), so fx treats it as impure.
        current = merged
        while current is not node:
            previous = current.args[0]
            gm.graph.erase_node(current)
            current = previous
        gm.graph.erase_node(node)
        return fused
    with gm.graph.inserting_after(fused):
        split = gm.graph.call_function(aten.unflatten.int, (fused, -1, [n, hv]))
    with gm.graph.inserting_after(split):
        heads = gm.graph.call_function(ops.transpose, (split, 1, 2))
    _infer(split)
    _infer(heads)
    node.replace_all_uses_with(heads)
    gm.graph.erase_node(node)
    return fused


def _pack_projection(gm: fx.GraphModule, fused: fx.Node) -> int:
    """Fold the packed Q/K/V Linear (``merge-siblings``) feeding ``fused`` into one Attention
    op, whose weight is ``W^T`` (``[in, q+k+v]``, the layout the contrib op takes); 1 when it did."""
    gm.graph.eliminate_dead_code()  # the head-split views of the projections, now unused
    parts = fused.args[:3]
    if not all(part.target is operator.getitem and part.args[1] == i and len(part.users) == 1
               for i, part in enumerate(parts) if isinstance(part, fx.Node)) or \
            not all(isinstance(part, fx.Node) for part in parts):
        return 0
    split = parts[0].args[0]
    if not (is_op(split, ops.split_with_sizes, ops.split) and all(p.args[0] is split for p in parts)
            and len(split.users) == 3 and arg(split, 2, "dim", 0) in (-1, 2)):
        return 0
    linear = split.args[0]
    if is_op(split, ops.split):  # equal parts (GPT-2's c_attn(...).split(width, dim=2))
        if not isinstance(split.args[1], int) or shape_of(linear) is None or shape_of(linear)[-1] != 3 * split.args[1]:
            return 0
        sizes = [split.args[1]] * 3
    else:
        sizes = [int(size) for size in split.args[1]]
    if not is_op(linear, ops.linear) or len(linear.users) != 1:
        return 0
    weight = constant(gm, arg(linear, 1, "weight"))
    bias_node = arg(linear, 2, "bias")
    bias = constant(gm, bias_node) if bias_node is not None else None
    x = linear.args[0]
    if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None) or \
            shape_of(x) is None or len(shape_of(x)) != 3:
        return 0
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    weight_t = add_constant(gm, weight.t().contiguous(), "packed_qkv_weight_t")
    bias_node = add_constant(gm, bias, "packed_qkv_bias") if bias_node is None else bias_node
    with gm.graph.inserting_before(fused):
        packed = gm.graph.call_function(
            kernels.attention._opoverload, (x, weight_t, bias_node, fused.args[3], fused.args[4], fused.args[5], sizes))
    packed.meta.update({k: v for k, v in fused.meta.items() if k != "val"})
    _infer(packed)
    fused.replace_all_uses_with(packed)
    for dead in (fused, *parts, split, linear):
        gm.graph.erase_node(dead)
    return 1
