"""The blip-2 input schema: validation of create requests and the public model record."""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

MODEL_SLUG = "blip-2"
MODEL_VERSION = "0.0.1"
DEFAULT_QUESTION = "What is this a picture of?"
DEFAULT_TEMPERATURE = 1.0
TEMPERATURE_MIN = 0.5
TEMPERATURE_MAX = 1.0
CAPTION_LABEL = "caption"
_BOOL_FIELDS = ("caption", "use_nucleus_sampling")
_STRING_FIELDS = ("question", "context")
_KNOWN_FIELDS = frozenset({"image", "temperature", *_BOOL_FIELDS, *_STRING_FIELDS})


class InputError(ValueError):
    """A create request whose body or input does not match the schema.

    :param message: what is wrong, naming the field.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ModelInput:
    """A validated blip-2 input.

    :param image: URL of the image.
    :param caption: caption the image instead of answering the question.
    :param question: the question (``DEFAULT_QUESTION`` when omitted; empty means captioning).
    :param context: earlier questions and answers prepended to the prompt.
    :param use_nucleus_sampling: sample instead of beam search.
    :param temperature: sampling temperature in [0.5, 1.0].
    """

    image: str
    caption: bool = False
    question: str = DEFAULT_QUESTION
    context: str | None = None
    use_nucleus_sampling: bool = False
    temperature: float = DEFAULT_TEMPERATURE

    @property
    def is_captioning(self) -> bool:
        """Whether the model captions the image (caption is true or the question is empty)."""
        return self.caption or not self.question.strip()

    @property
    def prompt(self) -> str | None:
        """The prompt given to the language model, or None when captioning."""
        if self.is_captioning:
            return None
        question = self.question.strip()
        if self.context and self.context.strip():
            return f"{self.context.strip()} Question: {question} Answer:"
        return f"Question: {question} Answer:"

    @property
    def label(self) -> str:
        """``"caption"`` when captioning, else the question: the second half of a ledger input key."""
        return CAPTION_LABEL if self.is_captioning else self.question.strip()

    @property
    def image_name(self) -> str:
        """Basename of the image URL's path, without query string."""
        return url_basename(self.image)


def url_basename(url: str) -> str:
    """Return the basename of a URL's path, never its query string or fragment.

    :param url: the URL.
    """
    path = unquote(urlsplit(url).path)
    return posixpath.basename(path.rstrip("/")) or "<no name>"


def redact_url(url: str) -> str:
    """Return a URL without its query string, fragment and credentials, safe to log.

    :param url: the URL.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def parse_input(raw: Any) -> ModelInput:
    """Validate the ``input`` object of a create request.

    :param raw: the decoded JSON value of ``input``.
    :raises InputError: when it does not match the schema.
    """
    if raw is None:
        raise InputError("missing required field: input")
    if not isinstance(raw, dict):
        raise InputError("field 'input' must be an object")
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        raise InputError(f"unknown input field: input.{unknown[0]}")
    values: dict[str, Any] = {"image": _parse_image(raw.get("image"))}
    for name in _BOOL_FIELDS:
        if raw.get(name) is not None:
            values[name] = _parse_bool(name, raw[name])
    for name in _STRING_FIELDS:
        if raw.get(name) is not None:
            values[name] = _parse_string(name, raw[name])
    if raw.get("temperature") is not None:
        values["temperature"] = _parse_temperature(raw["temperature"])
    return ModelInput(**values)


def _parse_image(value: Any) -> str:
    if value is None:
        raise InputError("missing required field: input.image")
    if not isinstance(value, str):
        raise InputError("field 'input.image' must be a string (an http or https URL)")
    parts = urlsplit(value.strip())
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # an invalid port
        valid = False
    if not valid:
        raise InputError("field 'input.image' must be an http or https URL")
    return value.strip()


def _parse_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"field 'input.{name}' must be a boolean")
    return value


def _parse_string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"field 'input.{name}' must be a string")
    return value


def _parse_temperature(value: Any) -> float:
    number: float
    if isinstance(value, bool):
        raise InputError("field 'input.temperature' must be a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InputError("field 'input.temperature' must be a number") from None
    else:
        raise InputError("field 'input.temperature' must be a number")
    if not math.isfinite(number) or not TEMPERATURE_MIN <= number <= TEMPERATURE_MAX:
        raise InputError(
            f"field 'input.temperature' must be between {TEMPERATURE_MIN} and {TEMPERATURE_MAX}, "
            f"got {value!r}"
        )
    return number


def request_schema() -> dict[str, Any]:
    """Return the JSON Schema of blip-2's inputs, with defaults."""
    return {
        "type": "object",
        "title": "Input",
        "required": ["image"],
        "properties": {
            "image": {
                "type": "string",
                "format": "uri",
                "title": "Image",
                "description": "Input image to query or caption (jpeg, png or webp URL)",
            },
            "caption": {
                "type": "boolean",
                "default": False,
                "title": "Caption",
                "description": "Select if you want to generate image captions instead of asking questions",
            },
            "question": {
                "type": "string",
                "default": DEFAULT_QUESTION,
                "title": "Question",
                "description": "Question to ask about this image. Leave blank for captioning",
            },
            "context": {
                "type": "string",
                "title": "Context",
                "description": "Optional - previous questions and answers to be used as context for "
                "answering current question",
            },
            "use_nucleus_sampling": {
                "type": "boolean",
                "default": False,
                "title": "Use Nucleus Sampling",
                "description": "Toggles the model using nucleus sampling to generate responses",
            },
            "temperature": {
                "type": "number",
                "default": DEFAULT_TEMPERATURE,
                "minimum": TEMPERATURE_MIN,
                "maximum": TEMPERATURE_MAX,
                "title": "Temperature",
                "description": "Temperature for use with nucleus sampling",
            },
        },
    }


def model_record() -> dict[str, Any]:
    """Return the public model record of blip-2, as ``GET /v1/model?slug=blip-2`` answers it."""
    return {
        "title": "BLIP-2",
        "slug": MODEL_SLUG,
        "version": MODEL_VERSION,
        "output_type": "text",
        "description": "Answers questions about images and captions them (emulated locally).",
        "emulated": True,
        "request_schema": request_schema(),
    }
