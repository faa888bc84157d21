"""
What tells one version of an image from another, without downloading it where the store says.

Object stores and files report it in their metadata: an S3 object's ETag and size, a GCS object's
generation, a local file's size and modification time (each backend's ``fingerprint``). An
``http(s)://`` URL is asked with a ``HEAD``: its ``ETag``, or its ``Last-Modified`` with its
``Content-Length``; a server that reports neither has its content hashed (SHA-256, streamed). A
URL that cannot be read at all has no fingerprint: its results are never taken from a cache.
"""

from __future__ import annotations

import hashlib

from airflow_provider_blip2.storage.staging import FETCH_TIMEOUT

#: Bytes read at a time when an http(s) image is hashed.
HASH_CHUNK = 1024 * 1024


def http_fingerprint(url: str) -> str | None:
    """
    The fingerprint of an ``http(s)://`` image: ``http-etag:…``, ``http-modified:…:…`` or ``sha256:…``.

    :param url: The image URL (never logged: it may be signed).
    :return: The fingerprint, or ``None`` when the URL cannot be read.
    """
    import requests

    try:
        head = requests.head(url, allow_redirects=True, timeout=FETCH_TIMEOUT)
    except requests.RequestException:
        head = None
    if head is not None and head.status_code == 200:
        etag = head.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            return f"http-etag:{etag.strip(chr(34))}"
        modified, length = head.headers.get("Last-Modified"), head.headers.get("Content-Length")
        if modified and length:
            return f"http-modified:{modified}:{length}"
    return _content_hash(url)


def _content_hash(url: str) -> str | None:
    """``sha256:{hex}`` of the image's content, streamed; ``None`` when it cannot be read."""
    import requests

    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=FETCH_TIMEOUT) as answer:
            if answer.status_code != 200:
                return None
            for chunk in answer.iter_content(HASH_CHUNK):
                digest.update(chunk)
    except requests.RequestException:
        return None
    return f"sha256:{digest.hexdigest()}"
