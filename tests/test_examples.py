"""Every example runs (at small sizes, FXOPT_EXAMPLE_SMALL=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PLUGIN_DIR, plugin_metadata

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def _run(args: list[str], extra_path: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FXOPT_EXAMPLE_SMALL="1")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(extra_path + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script: str) -> None:
    result = _run([str(EXAMPLES / script)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fxopt report" in result.stdout or "report" in result.stdout.lower()


def test_custom_pass_plugin_tests_pass(tmp_path: Path) -> None:
    paths = [str(plugin_metadata(tmp_path)), str(PLUGIN_DIR)]
    result = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN_DIR),
                   "--ignore", str(PLUGIN_DIR / "test_lowering.py")], paths)  # tests/test_lowering.py runs it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
