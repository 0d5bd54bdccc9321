"""Text generation through fxopt: a Llama's generate() with torch.compile(backend="fxopt").

    python examples/generate_llama.py            # hidden 512, 4 layers, prompts 4 x 32, 32 new tokens

Prints prefill ms and decode ms/token for eager, Inductor, fxopt lossless, and fxopt with
int8 and int4 weight-only Linears (quantize-weights), each as a ratio to eager measured in
the same run (interleaved rounds), and each system's teacher-forced top-1 agreement with
eager on the tokens eager generated. Random weights, two threads. The measuring is
``fxopt bench --task generate`` (fxopt_bench/generate.py); this script adds the kernels each
fxopt graph chose and the report of the int8 weight-only decode graph.
"""

from __future__ import annotations

import os

import torch

from fxopt_bench.generate import FULL, QUICK, format_generate, run_generate

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


def main() -> None:
    torch.set_num_threads(2)
    # The test run leaves out Inductor and int4: Inductor builds C++ per graph, minutes on a small machine.
    systems = ["eager", "fxopt", "fxopt-int8-weights"] if SMALL else None
    rows = run_generate(quick=SMALL, systems=systems)
    print(format_generate(rows, QUICK if SMALL else FULL))
    for row in rows:
        for record in row.log.records if row.log is not None else []:
            kernels = [note for note in record.report.notes if note.startswith("weight-only-linear")]
            print(f"{row.system}, graph {record.index} ({', '.join(record.inputs[:1])}): "
                  f"{kernels[0] if kernels else '-'}")
    int8 = next(row for row in rows if row.system == "fxopt-int8-weights")
    if int8.log is not None:
        decode = next(r for r in int8.log.records if r.inputs and r.inputs[0].endswith(", 1]"))
        print(f"\nfxopt report of the int8 weight-only decode graph:\n{decode.report}")


if __name__ == "__main__":
    main()
