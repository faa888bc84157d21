"""
The pace of a budget: how much of its request rate it uses after 429s it did not expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Pace:
    """
    How much of its request rate a budget uses: cut after an unexpected 429, recovered step by step.

    A 429 that the budget let through means that something else spends the same API key (another
    process without a shared budget, another deployment): the budget halves its rate at most once
    per ``cooldown`` seconds, down to ``floor``, then wins back ``step`` of it per request answered
    without a 429, as additive-increase, multiplicative-decrease congestion control does.

    :param floor: The smallest share of the rate it keeps.
    :param step: Share of the rate won back per request answered without a 429.
    :param cooldown: Seconds in which several 429s count as one (they come in bursts).
    :param clock: Monotonic clock.
    """

    floor: float = 0.1
    step: float = 0.02
    cooldown: float = 2.0
    clock: Callable[[], float] = time.monotonic
    share: float = field(default=1.0, init=False)
    _last_cut: float = field(default=-float("inf"), init=False, repr=False)

    def limit(self, requests_per_minute: int) -> int:
        """The requests per window this pace allows: at least 1."""
        return max(1, int(requests_per_minute * self.share))

    def answered(self, *, rate_limited: bool) -> None:
        """
        Take one answer into account.

        :param rate_limited: Whether it was a 429.
        """
        now = self.clock()
        if rate_limited:
            if now - self._last_cut >= self.cooldown:
                self.share = max(self.floor, self.share / 2)
                self._last_cut = now
        else:
            self.share = min(1.0, self.share + self.step)
