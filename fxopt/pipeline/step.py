"""One run of one pass, as the manager hands it to its checks and instruments.

Its own module, below the manager, the checks and the instruments, which all speak of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxopt.pass_api import Pass, PassResult
from fxopt.report import PassRecord


@dataclass
class PassStep:
    """One run of one pass, as its checks and instruments see it."""

    pass_: Pass
    index: int  # 1-based position in the round
    total: int  # passes in the round
    round: int  # 1-based; see ``max_rounds``
    record: PassRecord  # the report row; checks and instruments fill their columns
    result: PassResult | None = None  # None until the pass returned a PassResult

    @property
    def modified(self) -> bool:
        return self.result is not None and self.result.modified
