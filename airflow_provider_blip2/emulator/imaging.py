"""Image download, decoding and the deterministic emulated model output."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import httpx
from PIL import Image

from airflow_provider_blip2.emulator.inputs import ModelInput, redact_url, url_basename

EMULATED_PREFIX = "[emulated]"
INPUT_DOWNLOAD_ERROR = "INPUT_DOWNLOAD_ERROR"
INPUT_VALIDATION_ERROR = "INPUT_VALIDATION_ERROR"
ALLOWED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
YES_NO_WORDS = frozenset(
    {"is", "are", "am", "was", "were", "does", "do", "did", "can", "could", "has", "have", "had"}
    | {"will", "would", "should", "shall", "may", "might", "must"}
)
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "red": (210, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 70, 220),
    "purple": (130, 50, 170),
    "pink": (245, 150, 190),
    "brown": (125, 80, 35),
}
USER_AGENT = "blip2-emulator"
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_THUMBNAIL_SIZE = (48, 48)
_URL_PATTERN = re.compile(r"https?://\S+")


class PredictionFailure(Exception):
    """A prediction that ends with status ``error``.

    :param error_code: machine-readable code such as ``INPUT_DOWNLOAD_ERROR``.
    :param error: short summary.
    :param error_message: human-readable detail.
    :param category: ``classification.category`` of the envelope.
    :param retryable: ``retryable`` of the envelope.
    """

    def __init__(
        self,
        error_code: str,
        error: str,
        error_message: str,
        category: str = "input",
        retryable: bool = False,
    ) -> None:
        super().__init__(error_message)
        self.error_code = error_code
        self.error = error
        self.error_message = error_message
        self.category = category
        self.retryable = retryable

    def envelope(self) -> dict[str, Any]:
        """Return the error envelope stored as the prediction's ``output``."""
        return {
            "error": self.error,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "classification": {"category": self.category},
            "retryable": self.retryable,
        }


@dataclass(frozen=True)
class ImageFacts:
    """What the emulator knows about a decoded image.

    :param sha256: hex digest of the downloaded bytes.
    :param format: ``jpeg``, ``png`` or ``webp``.
    :param width: width in pixels.
    :param height: height in pixels.
    :param color: name of the dominant colour.
    :param data: the downloaded bytes.
    """

    sha256: str
    format: str
    width: int
    height: int
    color: str
    data: bytes = field(repr=False)

    @property
    def orientation(self) -> str:
        """``landscape``, ``portrait`` or ``square``."""
        if self.width > self.height * 1.1:
            return "landscape"
        if self.height > self.width * 1.1:
            return "portrait"
        return "square"

    @property
    def size(self) -> str:
        """``WIDTHxHEIGHT``."""
        return f"{self.width}x{self.height}"


def safe_error_text(exc: BaseException) -> str:
    """Describe an exception without echoing any URL's query string.

    :param exc: the exception.
    """
    text = _URL_PATTERN.sub(lambda match: redact_url(match.group(0)), str(exc)).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


async def download_image(
    transport: httpx.AsyncBaseTransport, url: str, max_bytes: int, timeout: float
) -> bytes:
    """Download an image, following redirects, reading at most ``max_bytes``.

    The download talks to an httpx transport, not a client: httpx clients log every request URL at INFO
    level, and image URLs may be presigned (credentials in the query string) that must never be logged.

    :param transport: the HTTP transport.
    :param url: the image URL (never logged or echoed with its query string).
    :param max_bytes: the size cap.
    :param timeout: seconds the whole download may take.
    :raises PredictionFailure: ``INPUT_DOWNLOAD_ERROR`` when the URL cannot be fetched,
        ``INPUT_VALIDATION_ERROR`` when the file is too large.
    """
    name = url_basename(url)
    try:
        return await asyncio.wait_for(_follow(transport, httpx.URL(url), name, max_bytes, timeout), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _download_failure(name, f"timed out after {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise _download_failure(name, safe_error_text(exc)) from None


async def _follow(
    transport: httpx.AsyncBaseTransport, url: httpx.URL, name: str, max_bytes: int, timeout: float
) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        request = httpx.Request(
            "GET",
            url,
            headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
            extensions={"timeout": httpx.Timeout(timeout).as_dict()},
        )
        response = await transport.handle_async_request(request)
        response.request = request
        try:
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location:
                url = url.join(location)
                if url.scheme not in ("http", "https"):
                    raise _download_failure(name, f"redirected to an unsupported scheme {url.scheme!r}")
                continue
            if response.status_code >= 400:
                raise _download_failure(name, f"HTTP {response.status_code}")
            _check_declared_size(response, name, max_bytes)
            return await _read_capped(response, name, max_bytes)
        finally:
            await response.aclose()
    raise _download_failure(name, f"more than {MAX_REDIRECTS} redirects")


def unreachable(name: str) -> PredictionFailure:
    """The failure of an image URL a service on a private network cannot reach (only its uploads).

    :param name: the image's file name.
    """
    return _download_failure(name, "the service reaches no image URL but its own uploaded copies")


def _download_failure(name: str, detail: str) -> PredictionFailure:
    return PredictionFailure(
        INPUT_DOWNLOAD_ERROR,
        "failed to download input image",
        f"could not download image '{name}': {detail}",
    )


def _too_large(name: str, max_bytes: int) -> PredictionFailure:
    return PredictionFailure(
        INPUT_VALIDATION_ERROR,
        "input image too large",
        f"image '{name}' is larger than the limit of {max_bytes} bytes",
    )


def _check_declared_size(response: httpx.Response, name: str, max_bytes: int) -> None:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(name, max_bytes)


async def _read_capped(response: httpx.Response, name: str, max_bytes: int) -> bytes:
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer.extend(chunk)
        if len(buffer) > max_bytes:
            raise _too_large(name, max_bytes)
    return bytes(buffer)


def inspect_image(data: bytes, name: str) -> ImageFacts:
    """Decode image bytes with Pillow and describe them.

    :param data: the downloaded bytes.
    :param name: the image's name, for messages.
    :raises PredictionFailure: ``INPUT_VALIDATION_ERROR`` when the bytes are not a jpeg, png or webp image.
    """
    try:
        with Image.open(BytesIO(data)) as image:
            image_format = ALLOWED_FORMATS.get(image.format or "")
            if image_format is None:
                raise _invalid_image(name, f"unsupported image format {image.format}; use jpeg, png or webp")
            image.load()
            color = dominant_color(image)
            width, height = image.size
    except PredictionFailure:
        raise
    except Exception as exc:  # Pillow raises many kinds of errors on bad data
        raise _invalid_image(name, f"not a decodable image ({type(exc).__name__})") from None
    return ImageFacts(hashlib.sha256(data).hexdigest(), image_format, width, height, color, data)


def _invalid_image(name: str, detail: str) -> PredictionFailure:
    return PredictionFailure(INPUT_VALIDATION_ERROR, "invalid input image", f"image '{name}': {detail}")


def dominant_color(image: Image.Image) -> str:
    """Return the palette name that most pixels of a thumbnail of the image are closest to.

    :param image: a loaded Pillow image.
    """
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail(_THUMBNAIL_SIZE)
    raw = thumbnail.tobytes()
    counts: Counter[str] = Counter()
    for offset in range(0, len(raw), 3):
        counts[_nearest_color(raw[offset], raw[offset + 1], raw[offset + 2])] += 1
    return counts.most_common(1)[0][0] if counts else "gray"


def _nearest_color(red: int, green: int, blue: int) -> str:
    def distance(item: tuple[str, tuple[int, int, int]]) -> int:
        r, g, b = item[1]
        return (r - red) ** 2 + (g - green) ** 2 + (b - blue) ** 2

    return min(PALETTE.items(), key=distance)[0]


def emulated_output(facts: ImageFacts, model_input: ModelInput) -> str:
    """Return the deterministic, plainly emulated answer for an image and an input.

    :param facts: the decoded image.
    :param model_input: the validated input.
    """
    if model_input.is_captioning:
        return f"{EMULATED_PREFIX} a {facts.orientation} photo, mostly {facts.color}, {facts.size}"
    question = model_input.question.strip()
    digest = hashlib.sha256(facts.data + question.encode("utf-8")).digest()
    words = question.lower().split()
    if words and words[0] in YES_NO_WORDS:
        return f"{EMULATED_PREFIX} {'yes' if digest[0] % 2 == 0 else 'no'}"
    lowered = question.lower()
    if "what color" in lowered or "what colour" in lowered:
        return f"{EMULATED_PREFIX} {facts.color}"
    if lowered.startswith("how many"):
        return f"{EMULATED_PREFIX} {1 + digest[1] % 5}"
    return f"{EMULATED_PREFIX} mostly {facts.color}, {facts.size} (question: {question})"
