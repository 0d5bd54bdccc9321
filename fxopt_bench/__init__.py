"""fxopt_bench: ``fxopt bench``, fxopt measured side by side against eager PyTorch and the
strongest peers that are installed (``pip install 'fxopt[peers]'``).

    import fxopt_bench
    rows = fxopt_bench.compare(model, (ids,))   # int8 peers and fxopt's int8, side by side
    print(fxopt_bench.format_rows(rows))

Systems are data (:data:`fxopt_bench.systems.SYSTEMS`), models are built from code or
configs (:data:`fxopt_bench.models.MODELS`), and every latency comes from one interleaved
loop with its spread (:func:`fxopt_bench.timing.measure_side_by_side`, the core's
:mod:`fxopt.latency`). fxopt's core does not import this package; ``fxopt bench`` loads it
when it runs.
"""

from __future__ import annotations

from fxopt_bench.run import ROW_FIELDS, BenchConfig, Row, compare, format_rows, run_bench, run_model
from fxopt_bench.systems import SYSTEMS, BenchContext, Prepared, System, Unavailable
from fxopt_bench.timing import Speedup, Timing, measure_side_by_side, speedup

__all__ = [
    "ROW_FIELDS",
    "SYSTEMS",
    "BenchConfig",
    "BenchContext",
    "Prepared",
    "Row",
    "Speedup",
    "System",
    "Timing",
    "Unavailable",
    "compare",
    "format_rows",
    "measure_side_by_side",
    "run_bench",
    "run_model",
    "speedup",
]
