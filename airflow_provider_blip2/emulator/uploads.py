"""The emulator's uploads: ``POST /v1/upload/presign``, the signed PUT, and the copies it serves.

As the service documents it: a presign answers ``{"id", "presigned_url", "public_url", "expires_at",
"required_headers"}``; the client PUTs the raw bytes to ``presigned_url`` within 15 minutes with
every header of ``required_headers`` verbatim and a ``Content-Type`` equal to the one it asked for
(the URL is signed for those values: a missing or changed one is a 403 signature error); the copy
is then served at ``public_url`` until its retention ends. Predictions read an uploaded copy from
the store itself, so an emulator that fetches nothing else (``fetch_only_uploads``, a service on a
network that reaches no image URL) still predicts uploaded images.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from fastapi import FastAPI

#: Retention bounds and default, in seconds (60 s to 365 days; 180 days when none is asked).
MIN_RETENTION = 60
MAX_RETENTION = 365 * 86400
DEFAULT_RETENTION = 180 * 86400
#: Seconds a presigned URL accepts its PUT.
PUT_WINDOW = 900.0
#: The largest file accepted.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
CONTENT_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
FILE_TYPES = ("image", "video", "audio", "other")
FILES_PATH = "/_storage/files/"
_FILE_URL = re.compile(r"/_storage/files/([0-9a-f-]{36})/")


@dataclass
class Upload:
    """One presigned upload and, once PUT, its bytes.

    :param id: the upload's id.
    :param content_type: the Content-Type it was signed for.
    :param retention: seconds the copy is kept, as asked (unscaled).
    :param put_until: ``time.monotonic()`` after which the PUT is refused.
    :param expires_at: ``time.monotonic()`` after which the copy is gone.
    :param data: the bytes, once uploaded.
    """

    id: str
    content_type: str
    retention: float
    put_until: float
    expires_at: float
    data: bytes | None = field(default=None, repr=False)


class UploadStore:
    """The uploads of one emulator, in memory.

    :param scale: multiplies every duration (the emulator's ``time_scale``).
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.secret = secrets.token_bytes(16)
        self.uploads: dict[str, Upload] = {}
        self.presigns = 0
        self.puts = 0
        self.puts_refused = 0
        self.reads = 0
        self.retentions: list[float] = []

    def signature(self, upload_id: str, content_type: str) -> str:
        """The signature of a presigned URL: the upload and the Content-Type it allows."""
        return hmac.new(self.secret, f"{upload_id}\n{content_type}".encode(), hashlib.sha256).hexdigest()

    def presign(self, content_type: str, retention: float) -> Upload:
        """Open an upload; the caller answers with its URLs."""
        now = time.monotonic()
        upload = Upload(
            id=str(uuid.uuid4()),
            content_type=content_type,
            retention=retention,
            put_until=now + PUT_WINDOW * self.scale,
            expires_at=now + retention * self.scale,
        )
        self.uploads[upload.id] = upload
        self.presigns += 1
        self.retentions.append(retention)
        return upload

    def copy_of(self, url: str) -> bytes | None:
        """The bytes behind one of this store's public URLs, while kept; ``None`` for any other URL."""
        match = _FILE_URL.search(url)
        upload = self.uploads.get(match.group(1)) if match else None
        if upload is None or upload.data is None or time.monotonic() >= upload.expires_at:
            return None
        self.reads += 1
        return upload.data

    def snapshot(self) -> dict[str, Any]:
        """The counters of the ledger's ``uploads`` entry."""
        return {
            "presigns": self.presigns,
            "puts": self.puts,
            "puts_refused": self.puts_refused,
            "reads": self.reads,
            "max_retention_s": max(self.retentions, default=None),
        }


def _store(request: Request) -> UploadStore:
    from airflow_provider_blip2.emulator.app import _emulator

    return _emulator(request).uploads


async def presign(request: Request) -> Response:
    """``POST /v1/upload/presign``: a short-lived upload URL for a file without one.

    :param request: the request.
    """
    from airflow_provider_blip2.emulator.app import _bad_request, admit, read_json_body

    await admit(request, "presign")
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise _bad_request("request body must be a JSON object")
    content_type = body.get("content_type")
    if content_type not in CONTENT_TYPES:
        raise _bad_request(f"content_type must be one of {', '.join(CONTENT_TYPES)}")
    if body.get("file_type", "image") not in FILE_TYPES:
        raise _bad_request(f"file_type must be one of {', '.join(FILE_TYPES)}")
    retention = _retention(body)
    store = _store(request)
    upload = store.presign(str(content_type), retention)
    base = str(request.base_url).rstrip("/")
    query = f"X-Amz-Expires=900&X-Amz-Signature={store.signature(upload.id, upload.content_type)}"
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=retention)
    return JSONResponse(
        {
            "id": upload.id,
            "presigned_url": f"{base}/_storage/uploads/{upload.id}?{query}",
            "public_url": f"{base}{FILES_PATH}{upload.id}/{upload.id}.{CONTENT_TYPES[upload.content_type]}",
            "expires_at": expires.isoformat().replace("+00:00", "Z"),
            "required_headers": {"x-amz-meta-file-id": upload.id, "x-amz-meta-source": "airflow"},
        }
    )


def _retention(body: dict[str, Any]) -> float:
    from airflow_provider_blip2.emulator.app import _bad_request

    value = body.get("expires_in_seconds")
    if value is None and body.get("ttl_days") is not None:
        value = float(body["ttl_days"]) * 86400
    if value is None:
        return float(DEFAULT_RETENTION)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not MIN_RETENTION <= value <= MAX_RETENTION
    ):
        raise _bad_request(f"expires_in_seconds must be between {MIN_RETENTION} and {MAX_RETENTION}")
    return float(value)


def _refused(store: UploadStore, message: str) -> Response:
    store.puts_refused += 1
    body = f"<Error><Code>SignatureDoesNotMatch</Code><Message>{message}</Message></Error>"
    return Response(body, status_code=403, media_type="application/xml")


async def put_upload(request: Request) -> Response:
    """``PUT /_storage/uploads/{id}``: the signed upload (object storage: no API key, no rate limit).

    :param request: the request.
    """
    from airflow_provider_blip2.emulator.app import _emulator

    store = _store(request)
    upload = store.uploads.get(request.path_params["upload_id"])
    if upload is None:
        return _refused(store, "unknown upload")
    if store.puts_refused < _emulator(request).config.refuse_puts:
        return _refused(store, "the signature does not match (injected)")
    expected = store.signature(upload.id, upload.content_type)
    if not hmac.compare_digest(request.query_params.get("X-Amz-Signature", ""), expected):
        return _refused(store, "the signature does not match")
    if time.monotonic() > upload.put_until:
        return _refused(store, "the presigned URL has expired")
    if request.headers.get("content-type") != upload.content_type:
        return _refused(store, "Content-Type differs from the signed one")
    for name, value in {"x-amz-meta-file-id": upload.id, "x-amz-meta-source": "airflow"}.items():
        if request.headers.get(name) != value:
            return _refused(store, f"header {name} is missing or differs from the signed one")
    data = await request.body()
    if len(data) > MAX_UPLOAD_BYTES:
        return Response(status_code=413)
    upload.data = data
    store.puts += 1
    return Response(status_code=200)


async def get_file(request: Request) -> Response:
    """``GET /_storage/files/{id}/{name}``: an uploaded copy, while its retention lasts.

    :param request: the request.
    """
    data = _store(request).copy_of(str(request.url.path))
    if data is None:
        return Response(status_code=404)
    upload = _store(request).uploads[request.path_params["upload_id"]]
    return Response(data, media_type=upload.content_type)


def add_upload_routes(app: FastAPI) -> None:
    """Register the upload routes on the emulator's app.

    :param app: the app.
    """
    app.add_api_route("/v1/upload/presign", presign, methods=["POST"])
    app.add_api_route("/_storage/uploads/{upload_id}", put_upload, methods=["PUT"])
    app.add_api_route("/_storage/files/{upload_id}/{name}", get_file, methods=["GET"])
