"""What a single prediction's task records when the prediction has ended: its cost and predict time."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_blip2.client.models import PredictionOutcome

#: XCom keys of what the API reported for the finished prediction (all attempts of the try).
COST_XCOM_KEY = "cost"
PREDICT_TIME_XCOM_KEY = "predict_time"


def try_cost(spent: float | None, outcome: PredictionOutcome) -> float | None:
    """
    The cost of a try: its earlier predictions' and this one's, ``None`` when none was reported.

    :param spent: The cost of the try's earlier predictions, when the API reported one.
    :param outcome: How this prediction ended.
    """
    costs = [cost for cost in (spent, outcome.cost) if cost is not None]
    return round(sum(costs), 9) if costs else None


def push_reported(context: Context, outcome: PredictionOutcome, cost: float | None) -> None:
    """
    Push the try's cost and the prediction's predict time to XCom, those the API reported.

    :param context: The task context.
    :param outcome: How the prediction ended.
    :param cost: The try's cost (:func:`try_cost`).
    """
    for key, value in ((COST_XCOM_KEY, cost), (PREDICT_TIME_XCOM_KEY, outcome.predict_time)):
        if value is not None:
            context["ti"].xcom_push(key=key, value=value)
