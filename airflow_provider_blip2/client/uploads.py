"""
Images that no URL reaches, sent through the API's upload endpoint: the rules, free of Airflow.

``POST /v1/upload/presign`` answers a short-lived ``presigned_url`` (and the headers it is signed
for) to PUT the raw bytes to, and the ``public_url`` that then serves them for as long as the
retention asked for lasts; that URL becomes the prediction's image. The presign is an API request
(it counts in the request budget); the PUT goes to object storage and does not.

An operator's ``image_transfer`` says which images go that way (:func:`transfer_for`): ``url``
(the image's URL is sent, as always), ``upload`` (every image is read by the worker and uploaded),
or ``auto`` (local paths and ``file://`` are uploaded, anything else sent as a URL).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow_provider_blip2.client.errors import Blip2Error, Blip2InputError, Blip2ProtocolError
from airflow_provider_blip2.client.wire import ApiRequest, ApiResponse

PRESIGN_PATH = "/v1/upload/presign"
TRANSFER_AUTO = "auto"
TRANSFER_URL = "url"
TRANSFER_UPLOAD = "upload"
IMAGE_TRANSFERS = (TRANSFER_AUTO, TRANSFER_URL, TRANSFER_UPLOAD)
#: The retention the API accepts, in seconds.
MIN_RETENTION = 60
MAX_RETENTION = 365 * 86400
#: Seconds added to the prediction's timeout for the retention of its uploaded copy: time for the
#: prediction to be sent (a batch's chunk) and queued before the service reads the copy.
RETENTION_MARGIN = 900
#: The largest file the API accepts.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
#: Magic bytes -> Content-Type of the images the model reads.
IMAGE_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"WEBP", 8, "image/webp"),
    (b"GIF8", 0, "image/gif"),
)


class Blip2UploadError(Blip2Error):
    """An image could not be uploaded: the PUT to the presigned URL was refused or failed."""


def transfer_for(image_transfer: str, uri: str, *, field_name: str = "image") -> str:
    """
    How one image reaches the service: ``url`` or ``upload``.

    :param image_transfer: The operator's ``image_transfer``: ``auto``, ``url`` or ``upload``.
    :param uri: The image as given.
    :param field_name: The operator's field, for the message.
    :raises Blip2InputError: for an unknown mode, or a local path with ``url``.
    """
    if image_transfer not in IMAGE_TRANSFERS:
        raise Blip2InputError(
            f"image_transfer must be one of {', '.join(IMAGE_TRANSFERS)}, got {image_transfer!r}"
        )
    local = local_path(uri) is not None
    if image_transfer == TRANSFER_URL and local:
        raise Blip2InputError(
            f"{field_name}: {uri!r} is a local file, which no URL reaches: set image_transfer='upload' "
            "(or 'auto') to upload it"
        )
    if image_transfer == TRANSFER_UPLOAD or local:
        return TRANSFER_UPLOAD
    return TRANSFER_URL


def local_path(uri: str) -> Path | None:
    """
    The file a local image names: a ``file://`` URI or a path; ``None`` for any URL.

    :param uri: The image as given.
    """
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise Blip2InputError(f"image: {uri!r} names another host; give file:///path or a path")
        return Path(unquote(parts.path))
    if "://" in uri:
        return None
    return Path(uri)


def sniff_image_type(head: bytes) -> str | None:
    """
    The Content-Type of an image by its first bytes (jpeg, png, webp, gif), or ``None``.

    :param head: The file's first 16 bytes at least.
    """
    for magic, offset, content_type in IMAGE_SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return content_type
    return None


def check_image_file(path: Path, *, field_name: str = "image") -> tuple[int, str]:
    """
    Check a file to upload before any request: it exists, is an image and is not too large.

    :param path: The file.
    :param field_name: The operator's field, for the message.
    :return: Its size in bytes and its Content-Type.
    :raises Blip2InputError: naming the field and the fix.
    """
    if not path.is_file():
        raise Blip2InputError(f"{field_name}: {str(path)!r} does not exist or is not a file on this worker")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise Blip2InputError(
            f"{field_name}: {str(path)!r} is {size / 2**20:.0f} MB, "
            f"more than the API's {MAX_UPLOAD_BYTES // 2**20} MB"
        )
    with path.open("rb") as stream:
        content_type = sniff_image_type(stream.read(16))
    if content_type is None:
        raise Blip2InputError(f"{field_name}: {str(path)!r} is not a jpeg, png, webp or gif image")
    return size, content_type


def retention_seconds(timeout: float, retention: float | None = None) -> int:
    """
    How long the service keeps an uploaded copy: as asked, or the prediction's timeout plus
    :data:`RETENTION_MARGIN`, never below the API's minimum.

    :param timeout: The prediction's timeout in seconds.
    :param retention: The operator's ``upload_retention``, or ``None``.
    :raises Blip2InputError: for a retention outside the API's 60 s to 365 days.
    """
    if retention is None:
        return max(MIN_RETENTION, math.ceil(timeout + RETENTION_MARGIN))
    if not MIN_RETENTION <= retention <= MAX_RETENTION:
        raise Blip2InputError(
            f"upload_retention must be between {MIN_RETENTION} s and {MAX_RETENTION} s (365 days), "
            f"got {retention!r}"
        )
    return math.ceil(retention)


def presign_request(content_type: str, retention: int) -> ApiRequest:
    """
    Request an upload URL (``POST /v1/upload/presign``); nothing is billed, so it is retried freely.

    :param content_type: The file's Content-Type (the PUT must send the same).
    :param retention: Seconds the service keeps the copy.
    """
    body = {"content_type": content_type, "file_type": "image", "expires_in_seconds": retention}
    return ApiRequest("POST", PRESIGN_PATH, json_body=body, label="presign upload")


@dataclass(frozen=True)
class PresignedUpload:
    """
    An upload the API opened: where to PUT the bytes, and where they are served afterwards.

    :param id: The upload's id.
    :param presigned_url: Where to PUT the bytes (a secret: never logged or stored).
    :param public_url: Where the copy is served once uploaded (readable by anyone who has it).
    :param expires_at: Unix time the copy's retention ends.
    :param required_headers: Headers the PUT must send verbatim (signed with the URL).
    """

    id: str
    presigned_url: str = field(repr=False)
    public_url: str = field(repr=False)
    expires_at: float
    required_headers: dict[str, str] = field(repr=False, default_factory=dict)

    def put_headers(self, content_type: str, size: int) -> dict[str, str]:
        """The PUT's headers: every required one, the Content-Type signed for and the length."""
        return {**self.required_headers, "Content-Type": content_type, "Content-Length": str(size)}


def parse_presign_response(response: ApiResponse, *, retention: int, now: float) -> PresignedUpload:
    """
    The upload a presign answered.

    :param response: A 2xx answer of ``POST /v1/upload/presign``.
    :param retention: The retention asked for (when the answer gives no ``expires_at``).
    :param now: Unix time now.
    :raises Blip2ProtocolError: when the answer lacks the URLs.
    """
    body: Any = response.json()
    urls = [body.get(key) if isinstance(body, dict) else None for key in ("presigned_url", "public_url")]
    if not all(isinstance(url, str) and url.startswith(("https://", "http://")) for url in urls):
        raise Blip2ProtocolError(
            "presign upload: the answer carries no presigned_url and public_url",
            request_id=response.request_id,
        )
    headers = body.get("required_headers") if isinstance(body.get("required_headers"), dict) else {}
    return PresignedUpload(
        id=str(body.get("id") or ""),
        presigned_url=str(urls[0]),
        public_url=str(urls[1]),
        expires_at=_expires_at(body.get("expires_at"), now + retention),
        required_headers={str(k): str(v) for k, v in headers.items()},
    )


def _expires_at(value: Any, default: float) -> float:
    if not isinstance(value, str):
        return default
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return default
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return min(default, moment.timestamp())
