"""The URIs and paths :class:`~airflow_provider_blip2.storage.ObjectStorage` accepts, and their parts."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

#: The schemes of objects in a cloud store: S3 and GCS.
REMOTE_SCHEMES = ("s3", "gs")
#: The schemes of plain web URLs, passed through unchanged.
HTTP_SCHEMES = ("http", "https")
#: The schemes of files on this machine: ``""`` for a plain path, and ``file``.
LOCAL_SCHEMES = ("", "file")


def uri_scheme(uri: str) -> str:
    """
    Return the lower-cased scheme of a URI.

    :param uri: Any URI or path.
    :return: The scheme, e.g. ``"s3"``; ``""`` for a plain path.
    """
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def is_remote_object(uri: str) -> bool:
    """
    Tell whether ``uri`` names an object in S3 or GCS.

    :param uri: Any URI or path.
    :return: True for ``s3://`` and ``gs://`` URIs.
    """
    return uri_scheme(uri) in REMOTE_SCHEMES


def is_http(uri: str) -> bool:
    """
    Tell whether ``uri`` is an ``http://`` or ``https://`` URL.

    :param uri: Any URI or path.
    :return: True for ``http(s)://`` URLs.
    """
    return uri_scheme(uri) in HTTP_SCHEMES


def is_local(uri: str) -> bool:
    """
    Tell whether ``uri`` names a file on this machine.

    :param uri: Any URI or path.
    :return: True for plain paths and ``file://`` URIs.
    """
    return uri_scheme(uri) in LOCAL_SCHEMES


def split_uri(uri: str) -> tuple[str, str, str]:
    """
    Split an ``s3://`` or ``gs://`` URI.

    :param uri: ``s3://bucket/key`` or ``gs://bucket/object``; the key may be empty (``s3://bucket/``).
    :return: ``(scheme, bucket, key)``, e.g. ``("s3", "bucket", "photos/cat.jpg")``.
    :raises ValueError: For other schemes, or when the bucket is missing.
    """
    scheme = uri_scheme(uri)
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{uri!r} is not an s3:// or gs:// URI")
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket: expected {scheme}://<bucket>/<key>")
    if any(c in bucket for c in "?#") or bucket.strip() != bucket:
        raise ValueError(f"{uri!r} has an invalid bucket name {bucket!r}")
    return scheme, bucket, key


def object_key(uri: str) -> tuple[str, str, str]:
    """
    Split an ``s3://`` or ``gs://`` URI that must name an object, not just a bucket or a folder.

    :param uri: ``s3://bucket/key`` or ``gs://bucket/object``.
    :return: ``(scheme, bucket, key)``, as :func:`split_uri`.
    :raises ValueError: As :func:`split_uri`, and when the key is empty or ends with ``/``.
    """
    scheme, bucket, key = split_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"{uri!r} names a bucket or a folder, not an object")
    return scheme, bucket, key


def local_path(uri: str) -> Path:
    """
    Return the path a plain path or ``file://`` URI names.

    :param uri: A plain path, or ``file:///path/to/file`` (percent-encoded; host empty or localhost).
    :return: The path.
    :raises ValueError: For a ``file://`` URI that names another host.
    """
    if uri_scheme(uri) != "file":
        return Path(uri)
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{uri!r}: file:// URIs must name a local path (file:///path/to/file)")
    return Path(unquote(parts.path))
