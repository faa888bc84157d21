"""
The batch operator's spending cap (``max_cost``): its value checked, the cost of a prediction
checked to be known, and how a batch that reached it ends.

What counts as spent, and how many predictions may start, is
:mod:`~airflow_provider_blip2.batch.spending`'s rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_blip2.batch.spending import needs_unit_cost, spent, unit_cost
from airflow_provider_blip2.client.models import PredictionOutcome

if TYPE_CHECKING:
    from airflow_provider_blip2.batch import BatchState
    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator

#: The status of an item the batch did not predict because it reached ``max_cost``.
SKIPPED = "skipped"


def check_max_cost(value: Any) -> float | None:
    """
    ``max_cost`` as a number (it may be rendered from a template as a string).

    :param value: The operator's rendered ``max_cost``.
    :raises AirflowFailException: When it is not a number >= 0.
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return None  # a template rendered as text renders a missing value as "None"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number >= 0:
        raise AirflowFailException(
            f"max_cost must be a number >= 0 in the API's cost unit (or None for no cap), got {value!r}"
        )
    return number


def stopped_at_max_cost(op: Blip2BatchPredictionOperator) -> PredictionOutcome:
    """
    What the output says of the items a batch did not predict, having reached ``max_cost``.

    :param op: The batch operator.
    """
    return PredictionOutcome(SKIPPED, error=f"not predicted: the batch reached max_cost={op.spending_cap:g}")


def max_cost_message(op: Blip2BatchPredictionOperator, state: BatchState, summary: dict[str, Any]) -> str:
    """
    The failure of a batch that reached ``max_cost``: the cap, the spend, what is left.

    :param op: The batch operator.
    :param state: The batch's progress.
    :param summary: Its summary.
    """
    estimate = unit_cost(state)
    each = f" at about {estimate:g} a prediction" if estimate is not None else ""
    cache = f" and in the result cache {op.cache_uri}, where the next run goes on" if op.cache_uri else ""
    return (
        f"The batch stopped at max_cost={op.spending_cap:g}: it spent {spent(state, estimate):g}{each}, "
        f"{summary['skipped']} of {summary['total']} items are left unpredicted; every finished result "
        f"is in {op.output_uri}{cache}"
    )


def check_costs_known(op: Blip2BatchPredictionOperator, state: BatchState) -> None:
    """
    Fail when ``max_cost`` cannot be kept: predictions ended and none reported a cost.

    :param op: The batch operator (with ``max_cost``).
    :param state: The batch's progress.
    :raises AirflowFailException: Naming ``max_cost`` and the fix.
    """
    if needs_unit_cost(state):
        raise AirflowFailException(
            f"max_cost={op.spending_cap:g} cannot be kept: the API reports no cost for this "
            "connection's predictions; remove max_cost, or cap the batch by the number of its images"
        )
