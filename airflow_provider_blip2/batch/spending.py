"""
A batch's spending cap (``max_cost``): what it spent, what one more prediction would cost, and
how many more it may start.

Spend counts, for this run's predictions (cached results cost nothing): the cost the API
reported, and where it reported none (a synchronous run's answer carries no metrics, an ambiguous
create may have been paid) the estimate of one prediction; predictions in flight count the
estimate too, as a reservation. The estimate is the mean cost reported so far in this run, else the
batch's ``unit_cost`` (the mean recorded in the
result cache). A batch with no estimate yet starts one prediction at a time.
"""

from __future__ import annotations

import math

from airflow_provider_blip2.batch.state import BatchState

#: Tolerance of the comparison with ``max_cost`` (costs are sums of decimals).
COST_EPSILON = 1e-9


def reported_cost(state: BatchState) -> float | None:
    """
    The mean cost the API reported for this run's predictions, or ``None`` before any report.

    :param state: The batch's progress.
    """
    reported = [
        result.cost
        for index, result in state.finished.items()
        if index not in state.cached and result.cost is not None and result.prediction_id
    ]
    return sum(reported) / len(reported) if reported else None


def unit_cost(state: BatchState) -> float | None:
    """
    What one prediction is taken to cost: the mean reported in this run, else the batch's estimate.

    :param state: The batch's progress.
    """
    reported = reported_cost(state)
    return state.unit_cost if reported is None else reported


def spent(state: BatchState, estimate: float | None) -> float:
    """
    What this run's predictions cost or may have cost, in flight ones included.

    :param state: The batch's progress.
    :param estimate: :func:`unit_cost` (``None``: unknown costs count 0).
    """
    each = estimate or 0.0
    total = sum(state.spent.values())
    for index, result in state.finished.items():
        if index in state.cached:
            continue
        if result.cost is not None:
            total += result.cost
        elif result.prediction_id or result.status == result.AMBIGUOUS:
            total += each
    total += each * len(state.in_flight)
    return total


def needs_unit_cost(state: BatchState) -> bool:
    """Whether the batch has predictions whose cost it cannot count: no report and no estimate."""
    if unit_cost(state) is not None:
        return False
    return any(
        result.cost is None and result.prediction_id
        for index, result in state.finished.items()
        if index not in state.cached
    )


def affordable(state: BatchState, max_cost: float | None) -> int | None:
    """
    How many more predictions may start without the spend possibly passing ``max_cost``.

    :param state: The batch's progress.
    :param max_cost: The cap; ``None``: no cap (``None`` is returned).
    :return: ``None`` without a cap; else a count (1 at a time while no estimate is known).
    """
    if max_cost is None:
        return None
    estimate = unit_cost(state)
    if estimate is None:
        return 0 if state.in_flight else 1
    left = max_cost - spent(state, estimate)
    if estimate <= 0:
        return len(state.pending()) if left >= -COST_EPSILON else 0
    return max(0, math.floor(left / estimate + COST_EPSILON))


def capped(state: BatchState, max_cost: float | None) -> bool:
    """Whether the batch must stop: items are pending, none in flight, and none may start."""
    return bool(state.pending()) and not state.in_flight and affordable(state, max_cost) == 0
