"""Export an optimized model to ONNX (int8 included) and run it in ONNX Runtime.

    python examples/export_onnx.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import fxopt

SMALL = os.environ.get("FXOPT_EXAMPLE_SMALL") == "1"


def main() -> None:
    torch.manual_seed(0)
    d_in, hidden, batch = (32, 64, 4) if SMALL else (1024, 4096, 64)
    model = nn.Sequential(
        nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, d_in)
    ).eval()
    x = torch.randn(batch, d_in)

    with tempfile.TemporaryDirectory() as tmp:
        # lossless: the default pipeline, exported and checked against ONNX Runtime
        path, report = fxopt.export_onnx(model, (x,), Path(tmp) / "model.onnx")
        print(report)

        # int8: QDQ in the graph, integer MatMuls in ONNX Runtime
        int8_path, int8_report = fxopt.export_onnx(
            model, (x,), Path(tmp) / "model-int8.onnx",
            passes=["remove-dropout", "fold-batchnorm", "quantize-int8"],
        )
        print(int8_report)

        session = ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        (y,) = session.run(None, {name: x.numpy()})
        reference = model(x).detach().numpy()
        print("int8 ONNX vs fp32 eager: max rel error",
              float(np.abs(y - reference).max() / np.abs(reference).max()))


if __name__ == "__main__":
    main()
