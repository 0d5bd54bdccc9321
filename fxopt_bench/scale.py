"""``fxopt bench --models scale``: pass-manager time per node on deep graphs, and the peak
memory of ``fxopt.compile``, each probe in a fresh interpreter."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fxopt_bench.systems import state_cost

SCALE_DEPTHS = (100, 1000, 2000)
QUICK_SCALE_DEPTHS = (25, 50, 100)


def run_scale(quick: bool = False, progress: Callable[[str], None] | None = None,
              depths: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Pass-manager time per node on deep MLPs, and peak memory of ``fxopt.compile``.

    Each probe runs in a fresh interpreter so its peak resident memory is its own: the
    kernel's high-water mark (VmHWM) is reset just before ``fxopt.compile`` and read right
    after. RSS sees every allocation (torch's CPU allocator, Python objects, fx graphs),
    which tracemalloc does not. The last probe is the wide benchmark MLP, whose weights
    dominate its memory, to relate the peak to the model's weight bytes. Each probe first
    compiles a tiny model, so one-time imports are not counted.
    """
    progress = progress or (lambda message: None)
    depths = list(depths or (QUICK_SCALE_DEPTHS if quick else SCALE_DEPTHS))
    probes: list[dict[str, Any]] = [{"depth": d, "width": 16} for d in depths]
    probes.append({"wide": True, "quick": quick})
    results = []
    for spec in probes:
        label = f"{spec['depth']} layers" if "depth" in spec else "wide mlp"
        progress(f"scale: {label} ...")
        out = subprocess.run([sys.executable, "-m", "fxopt_bench.scale", "--probe", json.dumps(spec)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scale probe {spec} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        progress(f"scale:   {row['nodes']} nodes, pass manager {row['pass_manager_s']:.2f}s "
                 f"({row['us_per_node']:.0f} us/node), peak +{row['peak_mb']:.0f} MB")
        results.append(row)
    return results


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process of :func:`run_scale`."""
    import fxopt
    from fxopt.registry import default_pipeline
    from fxopt_bench.models import build_mlp

    if spec.get("wide"):
        model, inputs = build_mlp(spec.get("quick", False))
        name = "mlp (wide)"
    else:
        model, inputs = build_mlp(depth=spec["depth"], width=spec["width"])
        name = f"mlp x{spec['depth']}"
    params, weight_bytes = state_cost(model)
    pipeline = default_pipeline()
    # Warm up on a tiny model first: the first export imports and initializes ~100 MB of
    # torch machinery (dynamo, sympy, fake tensors) that is no part of compiling this model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxopt.compile(*build_mlp(depth=2, width=4), passes=pipeline)
    gc.collect()

    # Memory: the whole of fxopt.compile, from a reset high-water mark.
    rss_before = _rss_bytes("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxopt.compile(model, inputs, passes=pipeline)
    compile_s = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") if reset else _maxrss_bytes()
    peak_growth = max(0, peak - rss_before)

    # Time: the pass manager alone, on a freshly captured graph.
    start = time.perf_counter()
    gm = fxopt.capture(model, inputs)
    capture_s = time.perf_counter() - start
    nodes = len(gm.graph.nodes)
    ctx = fxopt.PassContext(batches=[list(inputs)])
    start = time.perf_counter()
    _, records = fxopt.PassManager(pipeline).run(gm, ctx)
    manager_s = time.perf_counter() - start
    return {
        "model": name,
        "layers": spec.get("depth"),
        "nodes": nodes,
        "capture_s": capture_s,
        "pass_manager_s": manager_s,
        "us_per_node": manager_s / nodes * 1e6,
        "per_pass_s": {r.name: r.seconds for r in records},
        "compile_s": compile_s,
        "params": params,
        "weight_bytes": weight_bytes,
        "peak_mb": peak_growth / 1e6,
        "peak_over_weights": peak_growth / weight_bytes,
        "peak_measure": "VmHWM reset" if reset else "ru_maxrss (not reset: an upper bound on growth)",
    }


def _rss_bytes(field_name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024



if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    print(json.dumps(probe(json.loads(sys.argv[2]))))
