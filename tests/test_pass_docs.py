"""Every registered pass has a page in docs/passes/, and the page keeps up with the code:
it lists every refusal code the pass's module uses and the rewrite its docstring states."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import fxopt
from fxopt.rewrite import constraints

DOCS = Path(__file__).resolve().parent.parent / "docs" / "passes"
PAGES = {"cast-fp16": "cast-bf16"}  # one page for a pass family


def _codes_used(source: str) -> set[str]:
    literal = set(re.findall(r'Refusal\(\s*"([a-z0-9-]+)"', source))
    named = {getattr(constraints, name) for name in re.findall(r"\b([A-Z][A-Z_]+)\b", source)
             if isinstance(getattr(constraints, name, None), str)}
    return literal | {code for code in named if re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", code)}


def _source_with_helpers(module: str) -> str:
    """A pass module's source and that of the private helper modules beside it that it
    imports (``fxopt.passes._<name>``: its search description, say)."""
    source = inspect.getsource(importlib.import_module(module))
    helpers = sorted(set(re.findall(r"from fxopt\.passes\.(_\w+) import", source)))
    return "\n".join([source, *(inspect.getsource(importlib.import_module(f"fxopt.passes.{h}")) for h in helpers)])


@pytest.mark.parametrize("pass_type", fxopt.list_passes(), ids=lambda t: t.name)
def test_every_pass_has_a_page_that_lists_its_refusal_codes(pass_type) -> None:
    page = DOCS / f"{PAGES.get(pass_type.name, pass_type.name)}.md"
    assert page.is_file(), f"{pass_type.name} has no page in docs/passes/"
    text = page.read_text()
    source = _source_with_helpers(pass_type.__module__)
    missing = sorted(code for code in _codes_used(source) if f"`{code}`" not in text)
    assert not missing, f"docs/passes/{page.name} does not list the codes {missing}"


@pytest.mark.parametrize("pass_type", fxopt.list_passes(), ids=lambda t: t.name)
def test_the_page_states_the_rewrite_of_the_docstring(pass_type) -> None:
    text = (DOCS / f"{PAGES.get(pass_type.name, pass_type.name)}.md").read_text()
    doc = importlib.import_module(pass_type.__module__).__doc__ or ""
    arrows = [line.split("=>")[0].strip() for line in doc.splitlines() if "=>" in line]
    assert arrows, f"{pass_type.name}: the module docstring states no rewrite (an '=>' line)"
    squeeze = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    assert squeeze(arrows[0]) in squeeze(text), f"{pass_type.name}: the page does not show {arrows[0]!r}"


def test_every_file_in_passes_is_small() -> None:
    # A pass is one small file; what grows (a search description, helpers) goes beside it.
    sizes = {path.name: len(path.read_text().splitlines()) for path in (DOCS.parents[1] / "passes").glob("*.py")}
    assert sizes and all(lines <= 200 for lines in sizes.values()), {k: v for k, v in sizes.items() if v > 200}
