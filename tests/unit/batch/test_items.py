"""
Unit tests of a batch's items: building them from questions or a caption, and how the journal
names an image.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_blip2.batch import (
    BatchItem,
    build_items,
    image_key,
)
from airflow_provider_blip2.client.errors import Blip2InputError


def test_build_items_questions_and_captions() -> None:
    items = build_items(
        ["a", "b"],
        questions={"nsfw": "Is it explicit?", "gun": "Is there a gun?"},
        question=None,
        caption=False,
    )
    assert [(i.image, i.label) for i in items] == [("a", "nsfw"), ("a", "gun"), ("b", "nsfw"), ("b", "gun")]
    assert build_items(["a"], questions=None, question=None, caption=True) == [BatchItem("a", "caption", "")]
    assert build_items(["a"], questions=None, question="", caption=False) == [BatchItem("a", "caption", "")]
    assert build_items(["a"], questions=None, question=None, caption=False) == [
        BatchItem("a", "question", None)
    ]
    assert build_items(["a"], questions=None, question="Why?", caption=False) == [
        BatchItem("a", "question", "Why?")
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"questions": {}, "question": None, "caption": False}, "questions is empty"),
        ({"questions": {"x": "q"}, "question": "q", "caption": False}, "not both"),
        ({"questions": {"x": "q"}, "question": None, "caption": True}, "not both"),
        ({"questions": {"x": "  "}, "question": None, "caption": False}, "questions['x']"),
    ],
)
def test_build_items_refuses_ambiguous_inputs(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(Blip2InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_items(["a"], **kwargs)


def test_image_key_redacts_queries_and_keeps_urls_apart() -> None:
    signed = "https://h/a.jpg?X-Amz-Signature=abc"
    assert image_key(signed).startswith("https://h/a.jpg?<redacted ")
    assert "abc" not in image_key(signed)
    assert image_key(signed) != image_key("https://h/a.jpg?X-Amz-Signature=abd")
    assert image_key("https://h/a.jpg") == "https://h/a.jpg"
    assert image_key("s3://b/k.jpg") == "s3://b/k.jpg"
