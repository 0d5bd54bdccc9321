"""Why a rewrite was refused: a stable code to group and test by, and a detail for people."""

from __future__ import annotations

from dataclasses import dataclass

UNSPECIFIED = "unspecified"
"""The code of a skip given as plain text (a pass that predates refusal codes); the same
string as ``fxopt.pass_api._UNSPECIFIED``."""


@dataclass(frozen=True)
class Refusal:
    """A rewrite a rule matched but would not make.

    ``code`` is kebab-case and stable (``"shared-constant"``): the report groups skips by
    it and tests assert it. ``detail`` says, for this one site, what was found (sizes, node
    names); it changes freely.
    """

    code: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code
