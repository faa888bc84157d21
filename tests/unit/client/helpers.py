"""Shared values and test doubles of the client's unit tests."""

from __future__ import annotations

import json
import random
from typing import Any

from airflow_provider_blip2.client.wire import ApiResponse

IMAGE = "https://images.example.com/cats/chelsea.jpg"
SECRET = "X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIASECRETKEY"
SIGNED_IMAGE = f"{IMAGE}?{SECRET}"
REQUEST_ID = "7f1c2d3e-0000-4000-8000-1234567890ab"


def response(
    status_code: int, body: bytes | dict[str, Any] | list[Any] = b"", headers: dict[str, str] | None = None
) -> ApiResponse:
    """An ApiResponse; dict and list bodies are JSON-encoded."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ApiResponse(status_code, headers or {}, raw)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class UpperRng(random.Random):
    """A random source whose ``uniform`` always returns the upper bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


class LowerRng(random.Random):
    """A random source whose ``uniform`` always returns the lower bound."""

    def uniform(self, a: float, b: float) -> float:
        return a
