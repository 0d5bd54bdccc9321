"""fxopt's own kernels: ``torch.library`` custom ops that lowerings put into the graph.

Importing this package (``import fxopt`` does) registers the ops, their fake (shape)
implementations and their FLOP counts, and nothing else: a ``torch.export.save``d module
that calls ``torch.ops.fxopt.*`` loads once fxopt is imported.
"""

from fxopt.kernels import (
    int8,  # noqa: F401  (registers torch.ops.fxopt.int8_linear*)
    ort_fused,  # noqa: F401  (registers the ops ONNX Runtime runs fused)
    weight_only,  # noqa: F401  (registers torch.ops.fxopt.weight_only_linear*)
)
