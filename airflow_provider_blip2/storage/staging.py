"""
An image to upload, as a file on the worker: a local file as it is, anything else fetched first.

A local path or ``file://`` URI is checked where it lies. An http(s) URL (one only the workers
reach) is streamed to a temporary file, never held in memory; an ``s3://`` or ``gs://`` object is
read once through its hook and written there. Each is checked (an image, at most 100 MB) before any
upload request, and a temporary copy is removed once uploaded.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from airflow_provider_blip2.client.errors import Blip2InputError
from airflow_provider_blip2.client.inputs import redact_url
from airflow_provider_blip2.client.uploads import MAX_UPLOAD_BYTES, check_image_file, local_path
from airflow_provider_blip2.storage.errors import StorageError
from airflow_provider_blip2.storage.uris import is_http, is_remote_object

#: Seconds a fetch of an http(s) image may wait for its server.
FETCH_TIMEOUT = 60.0
_CHUNK = 1024 * 1024


class ImageFetchError(StorageError):
    """An image to upload could not be read from where it is (its URL, bucket or file)."""


@dataclass
class StagedImage:
    """
    An image ready to upload.

    :param path: The file.
    :param size: Its size in bytes.
    :param content_type: Its Content-Type, by its first bytes.
    :param temporary: Whether the file is a copy to remove after the upload.
    """

    path: Path
    size: int
    content_type: str
    temporary: bool

    def discard(self) -> None:
        """Remove a temporary copy."""
        if self.temporary:
            self.path.unlink(missing_ok=True)


def stage_image(uri: str, read_object: object, *, field_name: str = "image") -> StagedImage:
    """
    The image behind ``uri`` as a checked file on this worker.

    :param uri: A local path, ``file://``, ``http(s)://``, ``s3://`` or ``gs://`` URI.
    :param read_object: Reads a whole ``s3://`` or ``gs://`` object (``ObjectStorage.read_bytes``).
    :param field_name: The operator's field, for messages.
    :raises Blip2InputError: when a local file is missing, not an image or too large.
    :raises ImageFetchError: when a remote image cannot be read, or is not an image.
    """
    local = local_path(uri)
    if local is not None:
        size, content_type = check_image_file(local, field_name=field_name)
        return StagedImage(local, size, content_type, temporary=False)
    if not (is_http(uri) or is_remote_object(uri)):
        raise Blip2InputError(f"{field_name}: {uri!r} is not a path, file://, http(s)://, s3:// or gs:// URI")
    handle = tempfile.NamedTemporaryFile(prefix="blip2-upload-", delete=False)  # noqa: SIM115
    target = Path(handle.name)
    try:
        with handle:
            if is_http(uri):
                _stream(uri, handle)
            else:
                handle.write(read_object(uri))  # type: ignore[operator]
        size, content_type = check_image_file(target, field_name=field_name)
    except Blip2InputError:
        target.unlink(missing_ok=True)
        raise ImageFetchError(
            f"{redact_url(uri)} is not a jpeg, png, webp or gif image "
            f"of at most {MAX_UPLOAD_BYTES // 2**20} MB"
        ) from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return StagedImage(target, size, content_type, temporary=True)


def _stream(url: str, handle: object) -> None:
    """Download an http(s) image into an open file, in chunks, up to the upload limit."""
    import requests

    written = 0
    try:
        with requests.get(url, stream=True, timeout=FETCH_TIMEOUT) as answer:
            if answer.status_code != 200:
                raise ImageFetchError(f"{redact_url(url)} answered HTTP {answer.status_code}")
            for chunk in answer.iter_content(_CHUNK):
                written += len(chunk)
                if written > MAX_UPLOAD_BYTES:
                    raise ImageFetchError(f"{redact_url(url)} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
                handle.write(chunk)  # type: ignore[attr-defined]
    except requests.RequestException as error:
        raise ImageFetchError(f"{redact_url(url)} could not be read: {type(error).__name__}") from None
