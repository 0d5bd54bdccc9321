"""The int8 preset's static candidates: considered with calibration, dropped with a reason without."""

from __future__ import annotations

import importlib.util

import torch
from fxopt.passes.presets import (
    INT8,
    INT8_ATTENTION,
    INT8_LOOSE,
    INT8_STATIC,
    INT8_STATIC_OPENVINO,
    LOOSE_BUDGET,
    MERGE,
    SMOOTH_QUANT,
)
from torch import nn

import fxopt


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).eval()


def _note(opt: fxopt.OptimizedModule) -> str:
    return next(n for n in opt.report.notes if n.startswith("preset int8"))


def test_static_candidates_are_declared_for_cpu() -> None:
    static = [c for c in INT8.candidates if INT8_STATIC in c.passes or INT8_STATIC_OPENVINO in c.passes]
    eager = [c for c in static if c.backend == "eager"]
    # eager merges sibling Linears after quantizing them; ONNX Runtime and OpenVINO keep them apart
    assert [c.passes[1:] for c in eager] == [(INT8_STATIC, MERGE), (SMOOTH_QUANT, INT8_STATIC, MERGE)]
    openvino = [c for c in static if c.backend == "openvino"]
    # with and without smooth-quant: its multiply keeps LayerNorm's output float in OpenVINO
    assert [c.passes[1:] for c in openvino] == [(SMOOTH_QUANT, INT8_STATIC_OPENVINO, INT8_ATTENTION),
                                                (SMOOTH_QUANT, INT8_STATIC, INT8_ATTENTION),
                                                (INT8_STATIC_OPENVINO, INT8_ATTENTION),
                                                (INT8_STATIC_OPENVINO, INT8_ATTENTION, *INT8_LOOSE)]
    # the last only where the preset is held to a loose budget
    assert [c.min_budget for c in openvino] == [None, None, None, LOOSE_BUDGET]
    assert all(c.devices == ("cpu",) for c in static)
    # (the bf16 fallbacks merge them, as the bf16 preset does: OpenVINO runs merged bf16 siblings as fast)
    assert all(c.without == (MERGE,) for c in INT8.candidates if c.backend != "eager" and not c.fallback)


def test_with_calibration_the_static_candidates_are_timed() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), preset="int8", calibration=[(torch.randn(32, 64),) for _ in range(2)])
    note = _note(opt)
    # the two eager candidates are timed (OpenVINO's too where it is installed)
    for passes in (f"[exact, {INT8_STATIC}, {MERGE}]", f"[exact, {SMOOTH_QUANT}, {INT8_STATIC}, {MERGE}]"):
        assert f"{passes} on eager" in note and f"{passes} on eager dropped" not in note, note
    if importlib.util.find_spec("openvino") is not None:
        assert f"{INT8_ATTENTION}] on openvino dropped" not in note, note
    assert f"{INT8_STATIC}] on eager dropped" not in note, note
    with torch.no_grad():
        reference = model(x)
        assert float((opt(x) - reference).abs().max() / reference.abs().max()) <= 0.05


def test_without_calibration_the_static_candidates_are_dropped_with_the_reason() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    opt = fxopt.compile(model, (x,), preset="int8", backend="eager")
    note = _note(opt)
    reason = "dropped: needs calibration batches (calibration=[...]), none were given"
    for passes in (f"[exact, {INT8_STATIC}, {MERGE}]", f"[exact, {SMOOTH_QUANT}, {INT8_STATIC}, {MERGE}]"):
        assert f"{passes} on eager {reason}" in note, note
    assert f"chose [exact, {INT8_STATIC}]" not in note
