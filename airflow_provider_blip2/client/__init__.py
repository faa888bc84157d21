"""
The Eachlabs prediction API client for BLIP-2, free of Airflow.

One module per concern, each imported by the hook (the transports) and by nothing in Airflow:

- :mod:`.errors`: the exceptions and the status-code table;
- :mod:`.inputs`: validation of a prediction's inputs, URL redaction and scrubbing;
- :mod:`.wire`: requests, responses, endpoints, auth headers, error mapping, Retry-After;
- :mod:`.models`: prediction statuses, :class:`Prediction`, the one :class:`PredictionOutcome` and
  the one rule of what predicting again could change (:func:`~.models.failure_kind`);
- :mod:`.retry`: the one retry policy of requests;
- :mod:`.budget`: the client-side request budget;
- :mod:`.polling`: the one polling rule;
- :mod:`.settings`: the connection's settings, defaults and form fields.
"""

from __future__ import annotations

from airflow_provider_blip2.client.budget import RequestBudget, budget_for
from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2AuthenticationError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InputError,
    Blip2InsufficientBalanceError,
    Blip2NotFoundError,
    Blip2PredictionFailedError,
    Blip2ProtocolError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
    Blip2UnprocessableError,
)
from airflow_provider_blip2.client.inputs import PredictionInput, build_prediction_input, redact_url
from airflow_provider_blip2.client.models import (
    FailureKind,
    Prediction,
    PredictionOutcome,
    PredictionStatus,
    failure_kind,
)
from airflow_provider_blip2.client.polling import PredictionWatch
from airflow_provider_blip2.client.retry import RetryPolicy
from airflow_provider_blip2.client.settings import ClientSettings

__all__ = [
    "Blip2AmbiguousCreateError",
    "Blip2AuthenticationError",
    "Blip2BadRequestError",
    "Blip2Error",
    "Blip2InputError",
    "Blip2InsufficientBalanceError",
    "Blip2NotFoundError",
    "Blip2PredictionFailedError",
    "Blip2ProtocolError",
    "Blip2RateLimitError",
    "Blip2ServerError",
    "Blip2TransportError",
    "Blip2UnprocessableError",
    "ClientSettings",
    "FailureKind",
    "Prediction",
    "PredictionInput",
    "PredictionOutcome",
    "PredictionStatus",
    "PredictionWatch",
    "RequestBudget",
    "RetryPolicy",
    "budget_for",
    "build_prediction_input",
    "failure_kind",
    "redact_url",
]
