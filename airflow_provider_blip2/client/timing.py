"""
When to read a new prediction first, learned from how the connection's recent predictions ended.

Every read spends a request of the budget, and a read that finds the prediction still running is
wasted. The first read of a prediction just created comes :meth:`FirstReadTiming.delay` seconds
after its create answered. The delay is learned: a first read that found the prediction ended
shortens it a little (never below the ``predict_time`` the API reported, the time the model
itself ran); one that came too early lengthens it by a larger step. The steps are chosen so that
about one first read in twenty-five comes too early (``STEP_DOWN / (STEP_DOWN + STEP_UP / delay)``):
about 2.04 requests a prediction, where a fixed delay shorter than the service's latency costs 3.
The delay is kept in the connection's notes (:mod:`~.notes`): a process's, or with a Redis budget
the whole deployment's, so that mapped tasks, each in a process of its own, learn together.
"""

from __future__ import annotations

from airflow_provider_blip2.client.notes import Notes

#: A first read that found the prediction ended shortens the delay to this fraction of it.
STEP_DOWN = 0.99
#: A first read that came too early lengthens the delay by this many seconds.
STEP_UP = 0.5
#: The shortest delay, and the longest as a multiple of the poll interval.
MIN_DELAY = 0.25
MAX_DELAY_INTERVALS = 10.0
#: Seconds a learned delay is remembered without news.
REMEMBER_SECONDS = 86400.0


class FirstReadTiming:
    """
    The learned delay of a connection's first reads.

    :param notes: The connection's notes.
    :param model: The model slug (the delay is the model's).
    :param poll_interval: The caller's poll interval: the delay before anything was learned, and
        its ceiling (times :data:`MAX_DELAY_INTERVALS`).
    """

    def __init__(self, notes: Notes, model: str, poll_interval: float) -> None:
        self.notes = notes
        self.name = f"first_read:{model}"
        self.poll_interval = poll_interval

    def delay(self) -> float:
        """Seconds after a create's answer at which its first read is due."""
        try:
            learned = float(self.notes.recall(self.name) or self.poll_interval)
        except ValueError:
            learned = self.poll_interval
        return self._bounded(learned)

    def learn(self, used: float, *, ended_at_first_read: bool, predict_time: float | None) -> float:
        """
        Adjust the delay after a prediction's first read; return the new delay.

        :param used: The delay that read came after.
        :param ended_at_first_read: Whether it found the prediction ended.
        :param predict_time: The ``predict_time`` the API reported, when it did.
        """
        new = max(used * STEP_DOWN, predict_time or 0.0) if ended_at_first_read else used + STEP_UP
        new = self._bounded(new)
        self.notes.remember(self.name, f"{new:.3f}", REMEMBER_SECONDS)
        return new

    def _bounded(self, delay: float) -> float:
        return min(max(MIN_DELAY, delay), self.poll_interval * MAX_DELAY_INTERVALS)
