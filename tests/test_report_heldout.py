"""The report's held-out error: a lossy pass's worst error on the batches its choice was not
made on, from the budgeted search's details, in the record, the table and to_dict()."""

from __future__ import annotations

import re

import torch
from fxopt.passes import SwapActivationsLossy
from torch import nn

import fxopt
from fxopt.report import PassRecord


def gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)).eval()


def row_of(report: fxopt.report.Report, name: str) -> dict[str, str]:
    """The table row of pass ``name``, keyed by column name (the dashes under the header
    give each column's extent)."""
    lines = str(report).splitlines()
    header, dashes = lines[1], lines[2]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dashes)]
    (line,) = [line for line in lines[3:] if line.startswith(name + " ")]
    return {header[a:b].strip(): line[a:b].strip() for a, b in spans}


def test_calibrated_lossy_pass_reports_its_held_out_error() -> None:
    g = torch.Generator().manual_seed(1)
    x, calibration = torch.randn(16, 8, generator=g), [(torch.randn(16, 8, generator=g),) for _ in range(3)]
    swap = SwapActivationsLossy(mapping="gelu->gelu_tanh", budget=0.01)
    opt = fxopt.compile(gelu_mlp(), (x,), passes=["remove-dropout", swap], calibration=calibration)
    record = opt.report["swap-activations-lossy"]
    assert record.applied == 2
    worst = max(d["heldout_error"] for d in record.details)
    assert 0 < worst <= 0.01
    assert record.heldout_error == worst and not record.heldout_retry
    row = row_of(opt.report, "swap-activations-lossy")
    assert row["held-out err"] == f"{worst:.2e}"
    assert row["max rel err"] == f"{record.max_rel_err:.2e}"  # the column next to it is unchanged
    assert row_of(opt.report, "remove-dropout")["held-out err"] == "-"  # exact: nothing held out
    data = {p["name"]: p for p in opt.report.to_dict()["passes"]}
    assert data["swap-activations-lossy"]["heldout_error"] == worst
    assert data["swap-activations-lossy"]["heldout_retry"] is False
    assert data["remove-dropout"]["heldout_error"] is None


def test_without_calibration_nothing_is_held_out() -> None:
    swap = SwapActivationsLossy(mapping="gelu->gelu_tanh", budget=0.01)
    opt = fxopt.compile(gelu_mlp(), (torch.randn(16, 8),), passes=[swap])
    record = opt.report["swap-activations-lossy"]
    assert record.applied == 2 and all(d["heldout_error"] is None for d in record.details)
    assert record.heldout_error is None
    assert row_of(opt.report, "swap-activations-lossy")["held-out err"] == "-"


def test_worst_detail_counts_and_a_retry_is_starred() -> None:
    record = PassRecord("p", False, "applied", budget=0.01)
    record.take_details([{"heldout_error": 0.002, "heldout_retry": False},
                         {"heldout_error": 0.004, "heldout_retry": True},
                         {"heldout_error": None}, {"layer": "no search numbers"}])
    assert record.heldout_error == 0.004 and record.heldout_retry
    assert record.heldout_cell() == "4.00e-03*"
    assert len(record.details) == 4
    report = fxopt.report.Report(passes=[record])
    assert row_of(report, "p")["held-out err"] == "4.00e-03*"
    assert "held-out err *:" in str(report)
    record.take_details([])
    assert record.heldout_error is None and not record.heldout_retry and record.heldout_cell() == "-"
