"""fxopt's canonical IR: an ATen-level ``fx.GraphModule`` with frozen weights.

Weights live on the module as buffers and enter the graph through ``get_attr`` nodes.
Every node carries ``node.meta["val"]`` (a FakeTensor, possibly with symbolic sizes).
Passes match ops through the vocabulary in :mod:`fxopt.ir.ops`, never by string names,
and use :mod:`fxopt.ir.constants` to read and create constants so that no pass touches a
tensor in place. The submodules split the IR by concern; everything is re-exported here.
"""

from fxopt.ir.constants import (
    add_constant,
    all_finite,
    computed_constant,
    constant,
    constants,
    fake_mode_of,
    remove_unused_constants,
    unique_attr_name,
)
from fxopt.ir.derived import derived, release_freed_memory, share_as, stacked
from fxopt.ir.linear import (
    PROVENANCE_META,
    LinearParts,
    LinearWeights,
    PackedLinear,
    constant_users,
    insert_linear,
    linear_parts,
    linear_weights,
    packed_linear,
    unpack_linear,
    weight_parts,
)
from fxopt.ir.ops import arg, aten, call_nodes, count_ops, is_op, op_histogram, ops
from fxopt.ir.shapes import dtype_of, numel_hint, propagate_shapes, shape_of, size_hint, val
from fxopt.ir.surgery import (
    cleanup,
    copy_graph_module,
    infer_val,
    keep_pieces_valid,
    module_path,
    replace_node,
    subgraph_module,
    topo_order,
)

__all__ = [
    "PROVENANCE_META", "LinearParts", "LinearWeights", "PackedLinear", "add_constant", "all_finite", "arg", "aten", "call_nodes",
    "cleanup", "computed_constant", "constant", "constant_users", "constants", "copy_graph_module", "count_ops", "derived",
    "dtype_of", "fake_mode_of", "infer_val", "insert_linear", "is_op", "keep_pieces_valid", "linear_parts", "linear_weights",
    "module_path", "numel_hint", "op_histogram", "ops", "packed_linear", "propagate_shapes", "remove_unused_constants",
    "release_freed_memory", "share_as", "stacked", "subgraph_module",
    "replace_node", "shape_of", "size_hint", "topo_order", "unique_attr_name", "unpack_linear", "val",
    "weight_parts",
]
