"""
The shape of the API's rate limit: a sliding window, or a bucket that refills, found out at run time.

"60 requests a minute" is enforced in two common ways. A **sliding window** admits a request when
fewer than 60 were admitted in the last 60 s; a **token bucket** (the generic cell rate algorithm)
holds 60 tokens and wins one back every second, so after a burst of 60 it admits one a second where
the window admits none until the burst is a minute old. Both budgets (:mod:`~.budget`,
:mod:`~.shared_budget`) always pace by the window, which no limiter of either shape refuses, and go
past it only when the limiter is known to refill:

- ``window``: never past the window.
- ``bucket``: past a full window whenever a bucket, counted from each request's answer time with one
  request of margin, would admit the request.
- ``auto`` (the default): the first time a full window would hold back a request that a bucket
  would admit, that one request goes out as a probe. Admitted, the limiter refills, and the budget
  paces by the bucket; answered 429 (back-pressure like any other: its ``Retry-After`` is honoured),
  it counts a window, and the budget keeps pacing by it. Either lesson is a note of the
  connection's (:mod:`~.notes`) for :data:`REMEMBER_SECONDS`: one probe per process an hour, or per
  deployment with a shared budget. A request past the window answered 429 later teaches ``window``
  the same way.

The bucket is counted conservatively: a request may reach the server any time between its sending
and its answer, so it counts from its answer, and the requests still unanswered count as arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPE_AUTO = "auto"
SHAPE_WINDOW = "window"
SHAPE_BUCKET = "bucket"
#: The connection's ``rate_limit_shape`` values.
SHAPE_MODES = (SHAPE_AUTO, SHAPE_WINDOW, SHAPE_BUCKET)
#: The note a lesson is kept under.
NOTE = "rate_limit_shape"
#: Seconds a lesson is remembered.
REMEMBER_SECONDS = 3600.0
#: What a reservation returns for the probe (a grant: ``wait_sync`` stops at any value <= 0).
PROBE_GRANTED = -1.0
#: What a reservation returns for a request the bucket admits past a full window.
BUCKET_GRANTED = -2.0
#: Seconds to wait, at most, while another request is the probe.
PROBE_WAIT = 1.0


def shape_in_use(mode: str, note: str | None) -> str:
    """
    The shape a budget paces by now: the connection's choice, else the lesson noted, else ``auto``.

    :param mode: The connection's ``rate_limit_shape``.
    :param note: The note :data:`NOTE`, if any.
    """
    if mode != SHAPE_AUTO:
        return mode
    return note if note in (SHAPE_WINDOW, SHAPE_BUCKET) else SHAPE_AUTO


def bucket_wait(tat: float, now: float, open_requests: int, limit: int, window: float) -> float:
    """
    Seconds until a bucket of ``limit`` tokens refilled over ``window`` admits one more request.

    :param tat: The bucket's theoretical arrival time (:func:`after_answer`) after the answered
        requests.
    :param now: The clock now, on the same clock as ``tat``.
    :param open_requests: Requests sent and not answered yet (counted as arrived).
    :param limit: Requests allowed per window.
    :param window: Seconds of the window.
    :return: 0 or less when a request may go now (with one request of margin), else the wait.
    """
    interval = window / limit
    return max(tat, now) + (open_requests + 2 - limit) * interval - now


def after_answer(tat: float, answered_at: float, limit: int, window: float) -> float:
    """
    The bucket's theoretical arrival time after a request answered at ``answered_at``.

    :param tat: The theoretical arrival time before it.
    :param answered_at: When its answer came (no later than the server saw it).
    :param limit: Requests allowed per window.
    :param window: Seconds of the window.
    """
    return max(tat, answered_at) + window / limit


@dataclass(frozen=True)
class Answer:
    """
    How a request that a reservation granted was answered, for the lesson it may teach.

    :param granted: What the reservation returned: 0, :data:`PROBE_GRANTED` or :data:`BUCKET_GRANTED`.
    :param rate_limited: It was answered 429.
    :param conclusive: It was answered by the API itself (not a 5xx, a timeout or a dropped
        connection, which may come from before the limiter).
    """

    granted: float = 0.0
    rate_limited: bool = False
    conclusive: bool = True

    @classmethod
    def of(cls, granted: float, status: int | None) -> Answer:
        """
        The answer of a request from its grant and its HTTP status.

        :param granted: What its reservation returned.
        :param status: The HTTP status, or ``None`` when no answer came.
        """
        return cls(granted, status == 429, status is not None and status < 500)

    @property
    def past_window(self) -> bool:
        """Whether the request went past a full window (the probe, or a bucket's grant)."""
        return self.granted < 0

    def lesson(self, mode: str) -> str | None:
        """
        The shape this answer teaches a budget whose ``rate_limit_shape`` is ``mode``, or ``None``.

        :param mode: Only ``auto`` learns; a shape the connection names is kept whatever happens.
        """
        if mode != SHAPE_AUTO or not self.past_window:
            return None
        if self.rate_limited:
            return SHAPE_WINDOW
        if self.granted == PROBE_GRANTED and self.conclusive:
            return SHAPE_BUCKET
        return None

    @property
    def probe(self) -> bool:
        """Whether the request was the probe (its lock is freed when it is answered)."""
        return self.granted == PROBE_GRANTED


def describe(lesson: str, window: float) -> str:
    """
    The log line of a lesson.

    :param lesson: :data:`SHAPE_WINDOW` or :data:`SHAPE_BUCKET`.
    :param window: Seconds of the window.
    """
    hours = REMEMBER_SECONDS / 3600
    if lesson == SHAPE_BUCKET:
        return (
            f"The API admitted a request past a full {window:g} s window: its rate limit refills "
            f"gradually (a token bucket), and this connection's budget paces by it for {hours:g} h "
            "(set the connection's rate_limit_shape to window to never go past the window)"
        )
    return (
        f"The API answered 429 to a request past a full {window:g} s window: its rate limit counts a "
        f"sliding window, and this connection's budget keeps to it for {hours:g} h"
    )
