"""
The batch operator and its run loop, on the worker.

:class:`~airflow_provider_blip2.operators.batch.operator.Blip2BatchPredictionOperator` (importable
from here) resolves the items (:mod:`.images`), answers those the result cache holds
(:mod:`.cache`), hands the rest to synchronous runs (:mod:`.run`) or creates and polls them
(:mod:`.poll`) within ``max_cost`` (:mod:`.spending`), decides what a new try predicts again
(:mod:`.tries`) and writes the results (:mod:`.finish`). Its bookkeeping, free of Airflow, is
:mod:`airflow_provider_blip2.batch`; the triggers it defers to are in
:mod:`airflow_provider_blip2.triggers`.
"""

from __future__ import annotations

from airflow_provider_blip2.operators.batch.operator import Blip2BatchPredictionOperator

__all__ = ["Blip2BatchPredictionOperator"]
