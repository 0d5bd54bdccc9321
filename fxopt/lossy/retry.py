"""The one retry policy of lossy choices: how a choice that went over its budget on data it
was not fitted to is made again, tighter, instead of being dropped whole.

Two moments use it, with one object so their margins are set and read in one place:

* the budgeted search, when its choice fitted on half the batches is over budget on the
  held-out half: it chooses again on every batch, aiming at :meth:`RetryPolicy.after_heldout`;
* the pass manager, when a lossy pass's committed choice is over budget on the batches it
  never saw (the fresh input): it runs the pass once more with the budget
  :meth:`RetryPolicy.after_unseen`, and verifies it against the budget it was given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """``heldout_share``: the share of the budget a choice made again on every batch aims at
    (a margin standing in for the unseen data that is now missing). ``margin``: how far below
    what would have fitted a pass run again after an unseen-data failure aims."""

    heldout_share: float = 0.5
    margin: float = 0.9

    def after_heldout(self, budget: float) -> float:
        """The target of a choice made again on every batch after a held-out failure."""
        return budget * self.heldout_share

    def after_unseen(self, budget: float, error: float, fitted_error: float) -> float:
        """The budget of a pass run again after its choice measured ``error`` on unseen data
        (``fitted_error`` on the batches it was fitted to): lower by as much as the unseen data
        measured worse than those (or than the budget, if those were over too); 0 when nothing
        can be aimed at."""
        if not error > 0.0:
            return 0.0
        return budget * min(budget, max(fitted_error, 0.0)) / error * self.margin


RETRY = RetryPolicy()
