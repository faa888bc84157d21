"""
Unit tests of the client: the retry policy.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import random

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2AuthenticationError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InsufficientBalanceError,
    Blip2NotFoundError,
    Blip2ProtocolError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
    Blip2UnprocessableError,
)
from airflow_provider_blip2.client.retry import (
    RetryPolicy,
)
from airflow_provider_blip2.client.wire import (
    cancel_prediction_request,
    create_prediction_request,
    get_prediction_request,
)
from tests.unit.client.helpers import (
    IMAGE,
    LowerRng,
    UpperRng,
)

# --------------------------------------------------------------------------------------------------
# RetryPolicy
# --------------------------------------------------------------------------------------------------
GET = get_prediction_request("p")
CANCEL = cancel_prediction_request("p")
CREATE = create_prediction_request({"model": "blip-2", "version": "0.0.1", "input": {"image": IMAGE}})


@pytest.mark.parametrize(
    ("error", "get", "cancel", "create"),
    [
        pytest.param(Blip2RateLimitError("429", retry_after=1.0), True, True, True, id="429"),
        pytest.param(Blip2RateLimitError("429"), True, True, True, id="429-no-hint"),
        pytest.param(Blip2TransportError("reset", sent=True), True, True, False, id="transport-sent"),
        pytest.param(Blip2TransportError("refused", sent=False), True, True, True, id="transport-not-sent"),
        pytest.param(Blip2ServerError("500", status_code=500), True, True, False, id="5xx"),
        pytest.param(Blip2BadRequestError("400", status_code=400), False, False, False, id="400"),
        pytest.param(Blip2AuthenticationError("401", status_code=401), False, False, False, id="401"),
        pytest.param(Blip2InsufficientBalanceError("402"), False, False, False, id="402"),
        pytest.param(Blip2NotFoundError("404", status_code=404), False, False, False, id="404"),
        pytest.param(Blip2UnprocessableError("422"), False, False, False, id="422"),
        pytest.param(Blip2Error("418", status_code=418), False, False, False, id="other-4xx"),
        pytest.param(Blip2ProtocolError("garbage"), False, False, False, id="protocol"),
        pytest.param(Blip2AmbiguousCreateError("ambiguous"), False, False, False, id="ambiguous"),
        pytest.param(ValueError("bug"), False, False, False, id="not-a-blip2-error"),
    ],
)
def test_should_retry_matrix(error: BaseException, get: bool, cancel: bool, create: bool) -> None:
    policy = RetryPolicy()
    assert policy.should_retry(error, GET) is get
    assert policy.should_retry(error, CANCEL) is cancel
    assert policy.should_retry(error, CREATE) is create


@pytest.mark.parametrize(
    ("retry_after", "max_wait", "expected"),
    [(5.0, 30.0, 5.0), (0.0, 30.0, 0.0), (30.0, 30.0, 30.0), (100.0, 30.0, 30.0), (3600.0, 2.0, 2.0)],
)
@pytest.mark.parametrize("attempt", [1, 4])
def test_wait_honours_retry_after_capped_at_max_wait(
    retry_after: float, max_wait: float, expected: float, attempt: int
) -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=max_wait)
    error = Blip2RateLimitError("429", retry_after=retry_after)
    low = policy.wait_seconds(error, attempt, LowerRng())
    high = policy.wait_seconds(error, attempt, UpperRng())
    assert low == expected  # never shorter than the server asked (unless capped)
    assert expected <= high <= expected + 0.1  # a jitter of at most 0.1 s
    for seed in range(20):
        assert expected <= policy.wait_seconds(error, attempt, random.Random(seed)) <= expected + 0.1


def test_wait_without_retry_after_grows_exponentially_and_is_bounded() -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0)
    error = Blip2ServerError("503", status_code=503)
    ceilings = [policy.wait_seconds(error, attempt, UpperRng()) for attempt in range(1, 10)]
    floors = [policy.wait_seconds(error, attempt, LowerRng()) for attempt in range(1, 10)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert floors == [c / 2 for c in ceilings]
    rng = random.Random(7)
    for attempt in range(1, 40):
        wait = policy.wait_seconds(error, attempt, rng)
        assert 0.5 <= wait <= 30.0


@pytest.mark.parametrize(
    "error",
    [
        Blip2RateLimitError("429"),  # no Retry-After: backoff
        Blip2TransportError("reset", sent=False),
        None,
    ],
)
def test_wait_uses_backoff_when_no_retry_after(error: BaseException | None) -> None:
    policy = RetryPolicy(initial_wait=0.5, max_wait=3.0)
    assert policy.wait_seconds(error, 1, UpperRng()) == 0.5
    assert policy.wait_seconds(error, 3, UpperRng()) == 2.0
    assert policy.wait_seconds(error, 20, UpperRng()) == 3.0


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.max_elapsed, policy.initial_wait, policy.max_wait) == (
        6,
        120.0,
        1.0,
        30.0,
    )
