"""Every architecture of tests/zoo.py: captured with every Linear seen, the default pipeline
exact, int8 within budget, ONNX Runtime and torch.compile matching the model.

CI runs the fast subset; ``FXOPT_ZOO=full`` runs all of them (docs/architectures.md has the table).
"""

from __future__ import annotations

import os

import pytest
from zoo import ARCHITECTURES, CHECKS, run_checks

FULL = os.environ.get("FXOPT_ZOO") == "full"
SELECTED = [a for a in ARCHITECTURES if FULL or a.fast]


@pytest.mark.slow
@pytest.mark.parametrize("arch", SELECTED, ids=[a.name for a in SELECTED])
def test_architecture(arch) -> None:
    results = run_checks(arch)
    assert set(results) == set(CHECKS)
    failed = {check: outcome for check, outcome in results.items() if not outcome.startswith("ok")}
    assert not failed, failed
