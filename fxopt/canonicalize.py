"""Canonicalization: one spelling per op, so each pass matches exactly one form.

    op_(h, ...)                   =>  op(h, ...)                relu_, gelu_, dropout_, add_, mul_...
                                     when h is a fresh intermediate nothing else aliases
    addmm(b, x, t(W))             =>  linear(x, W, b)
    mm(x, t(W))                   =>  linear(x, W)
    matmul(x, T(W))               =>  linear(x, W)              T: t, transpose, permute, numpy_T
                                                                (x @ W.T, FalconLinear), mT
    addmm(b, x, W')  (W' [in,out]) =>  linear(x, W'^T, b)       the GPT-2 Conv1D form
    matmul(x, W')    (W' [in,out]) =>  linear(x, W'^T)
    add(linear(x, W), b)          =>  linear(x, W, b)           b a 1-D constant of W's out size
    view(linear(view(x, [-1, in]), W, b), [*lead, out])  =>  linear(x, W, b)
                                     when lead is x's leading shape
    to(x, dtype/device)           =>  x                         when x already has them (no copy)
    mul(x, 1)                     =>  x                         x floating point
    _assert_tensor_metadata(x)    =>  (nothing)                 export's check of what capture
                                                                already holds (x's dtype, device)
    sdpa(q, k, v, mask)           =>  sdpa(q, k, v)             mask computed from constants alone
                                                                (through broadcasts and views): all
                                                                True, or all zero when additive

Weights must be frozen constants; anything else is left as it is. Writes to constants or
inputs never reach this point: capture refuses them (see :func:`fxopt.capture.freeze`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir import (
    add_constant,
    arg,
    aten,
    cleanup,
    computed_constant,
    constant,
    infer_val,
    is_op,
    ops,
    shape_of,
    val,
)

_TRANSPOSES = (aten.numpy_T.default, aten.mT.default)
_SDPA = aten.scaled_dot_product_attention.default
# ops that copy, repeat or rearrange elements: a mask whose every element is the same keeps it
_ELEMENT_PRESERVING = (aten.expand.default, aten.unsqueeze.default, aten.view.default, aten.reshape.default,
                       aten._unsafe_view.default, aten.slice.Tensor, aten.select.int, aten.squeeze.dim,
                       aten.permute.default, aten.transpose.int, aten.clone.default, aten.contiguous.default)


def canonicalize(gm: fx.GraphModule, notes: list[str] | None = None) -> int:
    """Rewrite ``gm`` in place into canonical form; returns the number of rewrites. ``notes``
    gets a line for each rewrite that changes which kernel runs (the report's notes)."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        rewrites += _functional_form(node)
    for node in list(gm.graph.nodes):
        rewrites += _drop_identity(node)
    masks_nothing: dict[fx.Node, bool] = {}  # the attentions of a model share one mask: judged once
    dropped = sum(_drop_constant_mask(gm, node, masks_nothing) for node in list(gm.graph.nodes) if is_op(node, _SDPA))
    if dropped and notes is not None:
        notes.append(f"canonicalize: {dropped} attention mask(s) computed from constants that mask nothing "
                     "dropped: attention runs unmasked")
    rewrites += dropped
    for node in list(gm.graph.nodes):
        if is_op(node, ops.addmm, ops.mm, ops.matmul):
            rewrites += _matmul_to_linear(gm, node)
    for node in list(gm.graph.nodes):
        if is_op(node, ops.linear):
            rewrites += _fold_bias_add(gm, node)
    for node in list(gm.graph.nodes):
        if is_op(node, ops.linear):
            rewrites += _drop_flatten_around_linear(node)
    if rewrites:
        cleanup(gm)
    return rewrites


def _weight_out_in(gm: fx.GraphModule, node: fx.Node, rhs: fx.Node) -> fx.Node | None:
    """A constant node holding the ``[out, in]`` weight that ``x @ rhs`` multiplies by."""
    if is_op(rhs, ops.t, _TRANSPOSES) or (
        is_op(rhs, ops.transpose) and sorted(int(d) % 2 for d in rhs.args[1:3]) == [0, 1]
    ) or (is_op(rhs, ops.permute) and list(rhs.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])):
        source = rhs.args[0]
        weight = constant(gm, source)
        if weight is not None and weight.dim() == 2:
            return source
        return None
    weight = constant(gm, rhs)
    if weight is not None and weight.dim() == 2:
        return add_constant(gm, weight.t().contiguous(), f"{rhs.target}_t")
    return None


def _matmul_to_linear(gm: fx.GraphModule, node: fx.Node) -> int:
    if node.target == ops.addmm:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return 0
        bias, x, rhs = node.args[:3]
        bias_value = constant(gm, bias)
        if bias_value is None or bias_value.dim() != 1:
            return 0
    else:
        x, rhs = node.args[:2]
        bias = None
    x_val, rhs_val = val(x), val(rhs)
    if not isinstance(rhs_val, torch.Tensor) or rhs_val.dim() != 2:
        return 0
    if not isinstance(x_val, torch.Tensor) or x_val.dim() < (2 if node.target != ops.matmul else 1):
        return 0
    weight = _weight_out_in(gm, node, rhs)
    if weight is None:
        return 0
    with gm.graph.inserting_before(node):
        linear = gm.graph.call_function(ops.linear, (x, weight, bias) if bias is not None else (x, weight))
    linear.meta = dict(node.meta)
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    return 1


def _drop_flatten_around_linear(linear: fx.Node) -> int:
    flat = linear.args[0]
    if not is_op(flat, ops.view, ops.reshape) or len(flat.users) != 1:
        return 0
    users = list(linear.users)
    if len(users) != 1 or not is_op(users[0], ops.view, ops.reshape):
        return 0
    unflat = users[0]
    x = flat.args[0]
    x_shape, flat_shape, out_shape = shape_of(x), shape_of(flat), shape_of(unflat)
    if x_shape is None or flat_shape is None or out_shape is None or len(flat_shape) != 2:
        return 0
    if len(x_shape) < 2 or flat_shape[-1] != x_shape[-1]:
        return 0
    if tuple(out_shape[:-1]) != tuple(x_shape[:-1]):
        return 0
    linear.replace_input_with(flat, x)
    linear.meta["val"] = val(unflat)
    unflat.replace_all_uses_with(linear)
    linear.graph.erase_node(unflat)
    return 1


def functional_overload(target: Any) -> Any:
    """The out-of-place twin of an in-place ATen overload (``relu_`` -> ``relu``), or None."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.name.startswith("aten::") or not schema.name.endswith("_"):
        return None
    packet = getattr(aten, schema.name[len("aten::"):-1], None)
    twin = getattr(packet, target._overloadname, None) if packet is not None else None
    twin_schema = getattr(twin, "_schema", None)
    if twin_schema is None or len(twin_schema.arguments) != len(schema.arguments):
        return None
    if any(a.alias_info is not None for a in twin_schema.arguments):
        return None
    return twin


def _functional_form(node: fx.Node) -> int:
    """``op_(h, ...)`` -> ``op(h, ...)`` when nothing can observe the write to ``h``.

    ``h`` must be a fresh value (not a view or an in-place result of another tensor) and
    have no aliasing users (a view of ``h`` taken before the write would see it). Readers of
    ``h`` after the write read the new value: they are pointed at the new node.
    """
    if node.op != "call_function" or not node.args or written_argument(node) is not node.args[0]:
        return 0
    twin = functional_overload(node.target)
    target = node.args[0]
    if twin is None or not isinstance(target, fx.Node) or alias_root(target) is not target:
        return 0
    if target.op != "call_function":
        return 0  # a constant or an input: capture refuses those writes
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later_readers = []
    for user in target.users:
        if user is node:
            continue
        if alias_root(user) is not user or written_argument(user) is not None:
            return 0  # a view or another write shares the storage
        if order[user] > order[node]:
            later_readers.append(user)
    before = val(node)
    with node.graph.inserting_before(node):
        functional = node.graph.call_function(twin, node.args, node.kwargs)
    functional.meta = dict(node.meta)
    try:
        after = infer_val(functional)
    except Exception:
        after = None
    if isinstance(before, torch.Tensor) and (
        not isinstance(after, torch.Tensor) or after.dtype != before.dtype or after.shape != before.shape
    ):
        node.graph.erase_node(functional)  # e.g. add_ keeps h's dtype where add would promote
        return 0
    for reader in later_readers:
        reader.replace_input_with(target, functional)
    node.replace_all_uses_with(functional)
    node.graph.erase_node(node)
    return 1


_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout)


def _drop_identity(node: fx.Node) -> int:
    """Ops that return their input unchanged: each is a dispatch per call (a decode step runs a
    few hundred of them) and a form the exporters and patterns would otherwise have to know."""
    if is_op(node, aten._assert_tensor_metadata.default) and not node.users:
        node.graph.erase_node(node)
        return 1
    x = node.args[0] if is_op(node, _CASTS, aten.mul.Tensor) else None
    before, after = val(x), val(node)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return 0
    if (before.dtype, before.device, tuple(before.shape)) != (after.dtype, after.device, tuple(after.shape)):
        return 0
    if is_op(node, _CASTS):
        # non_blocking, copy, memory_format, pin_memory: any but the default may copy or relayout
        options = [*node.args[{aten.to.dtype: 2, aten.to.device: 3}.get(node.target, 1):],
                   *(v for k, v in node.kwargs.items() if k not in ("dtype", "device", "layout"))]
        if any(option not in (False, None, torch.preserve_format) for option in options):
            return 0
    elif not (before.is_floating_point() and type(node.args[1]) in (int, float) and node.args[1] == 1):
        return 0
    node.replace_all_uses_with(x)
    node.graph.erase_node(node)
    return 1


def _drop_constant_mask(gm: fx.GraphModule, sdpa: fx.Node, masks_nothing: dict[fx.Node, bool]) -> int:
    """An attention mask that masks nothing, dropped. Tracing a transformers model called
    without an attention mask materializes one (``arange(n) >= 0`` expanded to the batch):
    every backend runs attention without a mask faster, and ONNX's Attention with a mask
    guards fully masked rows (OpenVINO adds a NaN check on the output for it).
    ``masks_nothing``: the verdict on each mask's source so far."""
    source = arg(sdpa, 3, "attn_mask")
    while isinstance(source, fx.Node) and is_op(source, _ELEMENT_PRESERVING):
        source = source.args[0]
    if not isinstance(source, fx.Node):
        return 0
    if source not in masks_nothing:
        value = computed_constant(gm, source)
        masks_nothing[source] = value is not None and value.numel() > 0 and (
            bool(value.all()) if value.dtype == torch.bool else value.is_floating_point() and not value.any())
    if not masks_nothing[source]:
        return 0
    if len(sdpa.args) > 3:
        sdpa.args = (*sdpa.args[:3], None, *sdpa.args[4:])
    else:
        sdpa.kwargs = {k: v for k, v in sdpa.kwargs.items() if k != "attn_mask"}
    return 1


def _fold_bias_add(gm: fx.GraphModule, linear: fx.Node) -> int:
    """``add(linear(x, W), b)`` -> ``linear(x, W, b)`` for a 1-D constant ``b`` of size out."""
    if len(linear.args) > 2 and linear.args[2] is not None or linear.kwargs.get("bias") is not None:
        return 0
    users = list(linear.users)
    if len(users) != 1 or not is_op(users[0], ops.add) or users[0].kwargs.get("alpha", 1) != 1:
        return 0
    add = users[0]
    if len(add.args) != 2:
        return 0
    bias = add.args[1] if add.args[0] is linear else add.args[0]
    bias_value, weight = constant(gm, bias), constant(gm, linear.args[1])
    out_val, add_val = val(linear), val(add)
    if bias_value is None or weight is None or bias_value.dim() != 1 or bias_value.shape[0] != weight.shape[0]:
        return 0
    if not isinstance(out_val, torch.Tensor) or not isinstance(add_val, torch.Tensor):
        return 0
    if bias_value.dtype != out_val.dtype or add_val.dtype != out_val.dtype or add_val.shape != out_val.shape:
        return 0
    linear.args = (linear.args[0], linear.args[1], bias)
    linear.kwargs = {}
    add.replace_all_uses_with(linear)
    gm.graph.erase_node(add)
    return 1


def written_argument(node: fx.Node) -> Any:
    """The tensor argument an op writes to in place (``x`` of ``x.add_(1)``), or None."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return None
    for index, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is not None and info.is_write:
            if index < len(node.args) and not argument.kwarg_only:
                return node.args[index]
            return node.kwargs.get(argument.name)
    return None


def alias_root(value: Any) -> Any:
    """The node whose storage ``value`` shares: through views (``view``, ``t``, slicing),
    in-place results (``relu_`` returns its input) and ``getitem`` of split outputs."""
    while isinstance(value, fx.Node) and value.op == "call_function":
        if value.target is operator.getitem:
            value = value.args[0]
            continue
        schema = getattr(value.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            return value
        alias_set = schema.returns[0].alias_info.before_set
        source = None
        for index, argument in enumerate(schema.arguments):
            info = argument.alias_info
            if info is not None and info.before_set & alias_set:
                source = value.args[index] if index < len(value.args) else value.kwargs.get(argument.name)
                break
        if not isinstance(source, fx.Node):
            return value
        value = source
    return value
