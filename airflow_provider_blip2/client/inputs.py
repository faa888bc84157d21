"""
The inputs of a BLIP-2 prediction: validation against the model's schema, and URL redaction.

Validation names the field, the value and the allowed values. Image URLs may be presigned, so
whatever reaches a message or a log goes through :func:`redact_url` or :func:`scrub_urls` first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from airflow_provider_blip2.client.errors import Blip2InputError

DEFAULT_QUESTION = "What is this a picture of?"
TEMPERATURE_RANGE = (0.5, 1.0)
_URL_PATTERN = re.compile(r"https?://[^\s'\"<>]+")


# --------------------------------------------------------------------------------------------------
# URLs in messages and logs
# --------------------------------------------------------------------------------------------------
def split_public_url(url: str) -> tuple[str, str] | None:
    """
    Split an absolute URL into what may be shown of it: its origin and its path.

    No credentials, query string (a presigned URL's signature) or fragment survive.

    :param url: An absolute URL, perhaps presigned or carrying credentials.
    :return: ``("scheme://host[:port]", "/path")``, or ``None`` when ``url`` is not an absolute URL
        or cannot be parsed.
    """
    try:
        return _split_public_url(url)
    except ValueError:
        return None


def _split_public_url(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""  # .port raises ValueError on a bad port
    if not parts.scheme or not parts.netloc:
        return None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}", parts.path


def redact_url(url: str) -> str:
    """
    Return ``url`` without its query string and credentials, safe for logs and error messages.

    :param url: A URL that may carry a signature (presigned URL) or credentials.
    """
    try:
        public = _split_public_url(url)
    except ValueError:
        return "<unparseable URL>"
    if public is None:
        return url if len(url) <= 80 and "?" not in url else "<redacted>"
    origin, path = public
    suffix = "?<redacted>" if urlsplit(url).query else ""
    return f"{origin}{path}{suffix}"


def scrub_urls(text: str) -> str:
    """
    Replace every URL in ``text`` by its redacted form (no query string, no credentials).

    :param text: A message from the server that may quote a presigned URL.
    """
    return _URL_PATTERN.sub(lambda match: redact_url(match.group(0)), text)


def image_name(url: str) -> str:
    """
    The file name at the end of an image URL's path, for logs: no host, no query string.

    :param url: The image URL.
    """
    try:
        path = urlsplit(url).path
    except ValueError:
        return "<unparseable URL>"
    return path.rstrip("/").rsplit("/", 1)[-1] or "<no file name>"


# --------------------------------------------------------------------------------------------------
# The validated inputs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionInput:
    """
    Validated inputs of one BLIP-2 prediction. Build it with :func:`build_prediction_input`.

    :param image: http(s) URL of the image; the service downloads it.
    :param question: The question to ask, or ``None`` when captioning.
    :param context: Earlier Q&A prepended to the prompt, or ``None``.
    :param caption: Whether the model captions the image instead of answering a question.
    :param temperature: Sampling temperature (only used with nucleus sampling).
    :param use_nucleus_sampling: Sample instead of beam search.
    """

    image: str
    question: str | None
    context: str | None
    caption: bool
    temperature: float
    use_nucleus_sampling: bool

    def to_api(self) -> dict[str, Any]:
        """Return the ``input`` object of a create request."""
        payload: dict[str, Any] = {
            "image": self.image,
            "caption": self.caption,
            "use_nucleus_sampling": self.use_nucleus_sampling,
            "temperature": self.temperature,
        }
        if not self.caption:
            payload["question"] = self.question
            if self.context:
                payload["context"] = self.context
        return payload

    def describe(self) -> str:
        """A one-line description safe for logs: only the image's file name, never its URL."""
        task = "caption" if self.caption else f"question {self.question!r}"
        return f"{task} of image {image_name(self.image)!r}"


def build_prediction_input(
    image: Any,
    *,
    question: Any = None,
    context: Any = None,
    caption: Any = False,
    temperature: Any = 1.0,
    use_nucleus_sampling: Any = False,
) -> PredictionInput:
    """
    Validate BLIP-2 inputs against the model's schema and return them normalised.

    ``caption=True`` or an empty question means captioning, as the model does; a question together
    with ``caption=True`` is refused rather than silently ignored. ``temperature`` accepts numeric
    strings ("1") and must lie in [0.5, 1.0]; it only matters with nucleus sampling.

    :param image: http(s) URL of the image.
    :param question: Question to ask; ``None`` asks the model's default question.
    :param context: Earlier Q&A, ``Question: {q} Answer: {a}.`` joined by spaces.
    :param caption: Caption the image instead of answering a question.
    :param temperature: Sampling temperature, 0.5 to 1.0.
    :param use_nucleus_sampling: Sample instead of beam search.
    :raises Blip2InputError: naming the field, the value and the allowed values.
    """
    caption_flag = _check_bool("caption", caption)
    nucleus = _check_bool("use_nucleus_sampling", use_nucleus_sampling)
    temp = _check_temperature(temperature)
    text_question = _check_optional_text("question", question)
    text_context = _check_optional_text("context", context)
    captioning, final_question = _check_mode(caption_flag, text_question, text_context)
    return PredictionInput(
        image=_check_image_url(image),
        question=final_question,
        context=text_context or None,
        caption=captioning,
        temperature=temp,
        use_nucleus_sampling=nucleus,
    )


class PromptOptions(Protocol):
    """What a task asks of every one of its predictions beside the image and the question."""

    @property
    def context(self) -> str | None:
        """Earlier Q&A prepended to every prompt."""

    @property
    def temperature(self) -> float | str:
        """Sampling temperature, 0.5 to 1.0."""

    @property
    def use_nucleus_sampling(self) -> bool:
        """Sample instead of beam search."""


def prompt_input(image: Any, question: Any, caption: Any, options: PromptOptions) -> PredictionInput:
    """
    :func:`build_prediction_input` for one image and question, with a task's prompt options.

    :param image: http(s) URL of the image.
    :param question: Question to ask; ``None`` asks the model's default question.
    :param caption: Caption the image instead of answering a question.
    :param options: The operator or trigger whose ``context``, ``temperature`` and
        ``use_nucleus_sampling`` every prediction of the task shares.
    """
    return build_prediction_input(
        image,
        question=question,
        caption=caption,
        context=options.context,
        temperature=options.temperature,
        use_nucleus_sampling=options.use_nucleus_sampling,
    )


def check_prediction_id(prediction_id: Any) -> str:
    """
    Validate a prediction id before it goes into a URL path.

    :param prediction_id: The id.
    """
    if not isinstance(prediction_id, str) or not prediction_id or "/" in prediction_id:
        raise Blip2InputError(f"prediction_id must be a non-empty id without '/', got {prediction_id!r}")
    return prediction_id


def parse_seconds(value: Any) -> float | None:
    """
    A finite, non-negative number of seconds from a number or a numeric string; ``None`` otherwise.

    :param value: The value as received (a header, a body field, a connection extra).
    """
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Blip2InputError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def _check_optional_text(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise Blip2InputError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")


def _check_temperature(value: Any) -> float:
    low, high = TEMPERATURE_RANGE
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or math.isnan(number) or not low <= number <= high:
        raise Blip2InputError(f"temperature must be a number from {low} to {high}, got {value!r}")
    return number


def _check_image_url(value: Any) -> str:
    if not isinstance(value, str):
        raise Blip2InputError(f"image must be a non-empty URL string, got {type(value).__name__}")
    if not value.strip():
        raise Blip2InputError("image must be a non-empty URL string, got an empty string")
    image = value.strip()
    parts = urlsplit(image)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Blip2InputError(
            f"image must be an http:// or https:// URL the service can download, got {redact_url(image)!r}"
        )
    return image


def _check_mode(caption: bool, question: str | None, context: str | None) -> tuple[bool, str | None]:
    if caption and question:
        raise Blip2InputError(
            f"question={question!r} was given together with caption=True, which makes the model ignore "
            "the question: drop the question to caption, or set caption=False to ask it"
        )
    captioning = caption or question == ""
    if captioning and context:
        raise Blip2InputError(
            "context is only used when asking a question, but the model is captioning "
            "(caption=True or an empty question): set a question or drop the context"
        )
    return captioning, None if captioning else (question or DEFAULT_QUESTION)
