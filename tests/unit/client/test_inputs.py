"""
Unit tests of the client: input validation and URL redaction.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2InputError,
)
from airflow_provider_blip2.client.inputs import (
    DEFAULT_QUESTION,
    PredictionInput,
    build_prediction_input,
    redact_url,
)
from airflow_provider_blip2.client.wire import (
    build_create_body,
)
from tests.unit.client.helpers import (
    IMAGE,
    SECRET,
    SIGNED_IMAGE,
)


# --------------------------------------------------------------------------------------------------
# build_prediction_input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "caption", "question", "context"),
    [
        ({}, False, DEFAULT_QUESTION, None),
        ({"question": None}, False, DEFAULT_QUESTION, None),
        ({"question": "What color is the cat?"}, False, "What color is the cat?", None),
        ({"caption": True}, True, None, None),
        ({"caption": True, "question": None}, True, None, None),
        ({"caption": True, "question": ""}, True, None, None),
        ({"question": ""}, True, None, None),
        ({"question": "", "context": ""}, True, None, None),
        (
            {"question": "Is it asleep?", "context": "Question: What animal? Answer: a cat."},
            False,
            "Is it asleep?",
            "Question: What animal? Answer: a cat.",
        ),
        ({"question": "Why?", "context": ""}, False, "Why?", None),
        ({"context": "Question: a? Answer: b."}, False, DEFAULT_QUESTION, "Question: a? Answer: b."),
    ],
)
def test_build_prediction_input_modes(
    kwargs: dict[str, Any], caption: bool, question: str | None, context: str | None
) -> None:
    inputs = build_prediction_input(IMAGE, **kwargs)
    assert inputs.caption is caption
    assert inputs.question == question
    assert inputs.context == context
    assert inputs.image == IMAGE
    assert inputs.temperature == 1.0
    assert inputs.use_nucleus_sampling is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (1.0, 1.0),
        (1, 1.0),
        (0.75, 0.75),
        ("1", 1.0),
        ("0.7", 0.7),
        (" 0.9 ", 0.9),
        ("0.5", 0.5),
    ],
)
def test_temperature_accepted(value: Any, expected: float) -> None:
    inputs = build_prediction_input(IMAGE, temperature=value, use_nucleus_sampling=True)
    assert inputs.temperature == expected
    assert isinstance(inputs.temperature, float)
    assert inputs.use_nucleus_sampling is True


@pytest.mark.parametrize(
    "value",
    [
        *(0.49, 0.4999999, 1.0000001, 1.01, 0, 2, -1, "1.5", "0.1"),
        *(math.nan, "nan", math.inf, "-inf", True, False, "abc", "", None, [0.7], {"t": 1}),
    ],
)
def test_temperature_refused(value: Any) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(IMAGE, temperature=value)
    message = str(caught.value)
    assert "temperature" in message
    assert "0.5" in message and "1.0" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"caption": "yes"}, "caption"),
        ({"caption": 1}, "caption"),
        ({"caption": None}, "caption"),
        ({"use_nucleus_sampling": "true"}, "use_nucleus_sampling"),
        ({"use_nucleus_sampling": 0}, "use_nucleus_sampling"),
        ({"question": 42}, "question"),
        ({"question": ["why"]}, "question"),
        ({"context": 3.5}, "context"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(IMAGE, **kwargs)
    assert str(caught.value).startswith(field)


def test_caption_with_question_is_refused() -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(IMAGE, caption=True, question="What is it?")
    message = str(caught.value)
    assert "caption=True" in message
    assert "'What is it?'" in message
    assert "caption=False" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"caption": True, "context": "Question: a? Answer: b."},
        {"question": "", "context": "Question: a? Answer: b."},
    ],
)
def test_context_while_captioning_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(Blip2InputError, match="context is only used when asking a question"):
        build_prediction_input(IMAGE, **kwargs)


@pytest.mark.parametrize(
    "image",
    [
        "https://example.com/a.jpg",
        "http://127.0.0.1:8080/chelsea.jpg",
        "HTTPS://EXAMPLE.COM/A.PNG",
        SIGNED_IMAGE,
        "  https://example.com/padded.webp  ",
    ],
)
def test_image_urls_accepted(image: str) -> None:
    inputs = build_prediction_input(image)
    assert inputs.image == image.strip()


@pytest.mark.parametrize(
    "image",
    [
        "s3://bucket/key/cat.jpg",
        "ftp://files.example.com/cat.jpg",
        "file:///tmp/cat.jpg",
        "gs://bucket/cat.jpg",
        "images/cat.jpg",
        "./cat.jpg",
        "/abs/cat.jpg",
        "cat.jpg",
        "example.com/cat.jpg",
        "http://",
        "https:///no-host.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_image_must_be_http_url(image: str) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(image)
    assert str(caught.value).startswith("image must be an http:// or https:// URL")


@pytest.mark.parametrize(
    "image",
    [
        f"s3://bucket/key/cat.jpg?{SECRET}",
        f"ftp://files.example.com/cat.jpg?{SECRET}",
        f"images/cat.jpg?{SECRET}",
        f"cat.jpg?{SECRET}",
        f"https:///no-host.jpg?{SECRET}",
        f"file:///tmp/cat.jpg?{SECRET}",
        f"ftp://user:pw-{SECRET}@files.example.com/cat.jpg",
        f"ftp://files.example.com:notaport/cat.jpg?{SECRET}",
    ],
)
def test_image_error_never_leaks_the_query_string(image: str) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(image)
    message = str(caught.value)
    assert message.startswith("image")
    for leak in ("deadbeefcafe", "AKIASECRETKEY", "X-Amz"):
        assert leak not in message


@pytest.mark.parametrize("image", ["", "   ", None, 42, ["https://example.com/a.jpg"]])
def test_image_must_be_non_empty_string(image: Any) -> None:
    with pytest.raises(Blip2InputError, match="image must be a non-empty URL string"):
        build_prediction_input(image)


def test_to_api_question_shape() -> None:
    inputs = build_prediction_input(
        IMAGE,
        question="Is it asleep?",
        context="Question: What animal? Answer: a cat.",
        temperature="0.7",
        use_nucleus_sampling=True,
    )
    assert inputs.to_api() == {
        "image": IMAGE,
        "caption": False,
        "use_nucleus_sampling": True,
        "temperature": 0.7,
        "question": "Is it asleep?",
        "context": "Question: What animal? Answer: a cat.",
    }


def test_to_api_default_question_shape() -> None:
    assert build_prediction_input(IMAGE).to_api() == {
        "image": IMAGE,
        "caption": False,
        "use_nucleus_sampling": False,
        "temperature": 1.0,
        "question": DEFAULT_QUESTION,
    }


@pytest.mark.parametrize("kwargs", [{"caption": True}, {"question": ""}])
def test_to_api_caption_shape(kwargs: dict[str, Any]) -> None:
    assert build_prediction_input(IMAGE, **kwargs).to_api() == {
        "image": IMAGE,
        "caption": True,
        "use_nucleus_sampling": False,
        "temperature": 1.0,
    }


def test_to_api_is_json_serialisable_and_build_create_body() -> None:
    inputs = build_prediction_input(IMAGE, question="Why?")
    body = build_create_body(inputs, model="blip-2", version="0.0.1")
    assert json.loads(json.dumps(body)) == {"model": "blip-2", "version": "0.0.1", "input": inputs.to_api()}


def test_describe_names_the_image_file_but_not_its_url() -> None:
    name = IMAGE.rsplit("/", 1)[-1]
    assert build_prediction_input(SIGNED_IMAGE, caption=True).describe() == f"caption of image {name!r}"
    described = build_prediction_input(SIGNED_IMAGE, question="Why?").describe()
    assert described == f"question 'Why?' of image {name!r}"
    assert "://" not in described


def test_prediction_input_is_frozen() -> None:
    inputs = build_prediction_input(IMAGE)
    with pytest.raises(AttributeError):
        inputs.image = "https://other.example.com/x.jpg"  # type: ignore[misc]
    assert isinstance(inputs, PredictionInput)


# --------------------------------------------------------------------------------------------------
# redact_url
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/a/b.jpg", "https://example.com/a/b.jpg"),
        (SIGNED_IMAGE, f"{IMAGE}?<redacted>"),
        ("https://user:hunter2@example.com:8443/a.png", "https://example.com:8443/a.png"),
        ("https://token@example.com/a.png?x=1", "https://example.com/a.png?<redacted>"),
        ("http://example.com/a.jpg#fragment", "http://example.com/a.jpg"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
        ("cat.jpg", "cat.jpg"),
        ("cat.jpg?sig=1", "<redacted>"),
        ("x" * 81, "<redacted>"),
        ("x" * 80, "x" * 80),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"http://host:notaport/a.jpg?{SECRET}",
        f"https://host:99999/a.jpg?{SECRET}",
        f"http://[::1/a.jpg?{SECRET}",
    ],
)
def test_redact_url_never_raises_nor_leaks(url: str) -> None:
    redacted = redact_url(url)
    assert "deadbeefcafe" not in redacted
