"""A batch's items: one image and one question each, and how the journal names an image."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_blip2.client.errors import Blip2InputError

#: Label of the items of a batch that captions its images.
CAPTION_LABEL = "caption"
#: Label of the items of a batch that asks one question of every image.
QUESTION_LABEL = "question"


@dataclass(frozen=True)
class BatchItem:
    """
    One prediction of a batch: an image and what to ask of it.

    :param image: The image URI as the user gave it (``s3://``, ``gs://`` or ``https://``).
    :param label: Name of the question (``questions`` key, ``caption`` or ``question``).
    :param question: The question; ``None`` asks the API's default question, ``""`` captions.
    """

    image: str
    label: str
    question: str | None

    @property
    def captions(self) -> bool:
        """Whether this item captions its image (an empty question, as in the API)."""
        return self.question == ""

    def to_json(self) -> list[Any]:
        """Compact form for the journal."""
        return [self.image, self.label, self.question]

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> BatchItem:
        """Inverse of :meth:`to_json`."""
        return cls(str(value[0]), str(value[1]), None if value[2] is None else str(value[2]))


def image_key(uri: str) -> str:
    """
    How the journal and the results name an image: the URI, except for http(s) URLs with a query.

    Their query may be a signature: it is replaced by ``?<redacted {hash}>``, the hash (8 hex digits of
    the URL's SHA-256) telling apart URLs that differ only in their query.

    :param uri: The image URI as given.
    """
    if not uri.startswith(("http://", "https://")) or "?" not in uri:
        return uri
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return f"{uri.split('?', 1)[0]}?<redacted {digest}>"


def build_items(
    images: Sequence[str], *, questions: Mapping[str, str] | None, question: str | None, caption: bool
) -> list[BatchItem]:
    """
    Every (image, question) pair of a batch, image by image.

    :param images: Image URIs.
    :param questions: ``{"label": "question"}`` to ask several questions of every image.
    :param question: The one question to ask otherwise (``None``: the API's default question).
    :param caption: Caption every image instead.
    """
    if questions is not None:
        if not questions:
            raise Blip2InputError("questions is empty: give at least one {'label': 'question'}")
        if caption or question is not None:
            raise Blip2InputError("give either questions={...} or question/caption, not both")
        for label, text in questions.items():
            if not isinstance(text, str) or not text.strip():
                raise Blip2InputError(f"questions[{label!r}] must be a non-empty string, got {text!r}")
        return [BatchItem(image, str(label), text) for image in images for label, text in questions.items()]
    if caption or question == "":
        return [BatchItem(image, CAPTION_LABEL, "") for image in images]
    return [BatchItem(image, QUESTION_LABEL, question) for image in images]
