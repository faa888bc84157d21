"""
One interface over ``s3://``, ``gs://``, local paths and ``http(s)://`` URLs, for the Airflow worker.

:class:`ObjectStorage` hands each operation to the backend of the URI's scheme:
:class:`~airflow_provider_blip2.storage.s3.S3Backend` for ``s3://`` (the amazon provider's
``S3Hook``), :class:`~airflow_provider_blip2.storage.gcs.GCSBackend` for ``gs://`` (the google
provider's ``GCSHook``) and :class:`~airflow_provider_blip2.storage.local.LocalBackend` for plain
paths and ``file://`` URIs; ``http(s)://`` URLs are passed through. Both providers are optional
extras, imported on first use only: importing this package loads nothing but the standard library,
so a deployment that only captions ``https://`` images needs neither boto3 nor the Google client
libraries.
"""

from __future__ import annotations

import fnmatch
import mimetypes
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_provider_blip2.storage.base import Backend, CloudBackend
from airflow_provider_blip2.storage.errors import (
    MissingExtraError,
    ObjectNotFoundError,
    SigningError,
    StorageError,
    missing_bucket,
)
from airflow_provider_blip2.storage.gcs import GCSBackend
from airflow_provider_blip2.storage.local import LocalBackend
from airflow_provider_blip2.storage.masking import MASKED_SIGNED_URLS_PER_PROCESS, mask_signed_url
from airflow_provider_blip2.storage.s3 import S3Backend
from airflow_provider_blip2.storage.uris import (
    REMOTE_SCHEMES,
    is_http,
    is_local,
    is_remote_object,
    object_key,
    split_uri,
    uri_scheme,
)

__all__ = [
    "EXISTENCE_CHECK_THREADS",
    "IMAGE_PATTERNS",
    "MASKED_SIGNED_URLS_PER_PROCESS",
    "MAX_LISTED_MISSING",
    "MAX_SIGNED_URL_SECONDS",
    "MissingExtraError",
    "ObjectNotFoundError",
    "ObjectStorage",
    "SigningError",
    "StorageError",
    "is_remote_object",
    "split_uri",
]

#: Glob patterns of the image files :meth:`ObjectStorage.list_images` keeps by default.
IMAGE_PATTERNS: tuple[str, ...] = ("*.jpg", "*.jpeg", "*.png", "*.webp")
#: The longest validity S3 and GCS accept for a signed URL: 7 days.
MAX_SIGNED_URL_SECONDS = 7 * 24 * 3600
#: Threads :meth:`ObjectStorage.check_all_exist` uses for remote objects.
EXISTENCE_CHECK_THREADS = 8
#: How many missing URIs an error message lists.
MAX_LISTED_MISSING = 10


class ObjectStorage:
    """
    Read, write, list, check and sign objects in S3, GCS, local files and HTTP(S) URLs.

    ``s3://`` needs the ``amazon`` extra, ``gs://`` the ``google`` extra; each scheme's backend, and
    its hook and client, are created on first use and reused. Errors of the cloud libraries surface
    as :class:`StorageError` subclasses: :class:`ObjectNotFoundError` names the missing object or
    bucket, :class:`MissingExtraError` the extra to install. No error message contains a signed URL.

    :param aws_conn_id: The Airflow connection of type ``aws`` used for ``s3://`` URIs.
    :param gcp_conn_id: The Airflow connection of type ``google_cloud_platform`` used for ``gs://`` URIs.
    """

    def __init__(
        self, *, aws_conn_id: str = "aws_default", gcp_conn_id: str = "google_cloud_default"
    ) -> None:
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self._lock = threading.Lock()
        self._local = LocalBackend()
        self._remotes: dict[str, CloudBackend[Any]] = {}

    def signed_url(self, uri: str, *, expires_in: float) -> str:
        """
        Return a URL anyone can GET the object from, without credentials, until it expires.

        ``http(s)://`` URLs are returned unchanged. ``s3://`` objects get a presigned URL, ``gs://``
        objects a V4 signed URL. The object's existence is not checked (see :meth:`check_exists`).
        Signed URLs are registered with Airflow's secret masker before they are returned, so they
        are masked in task logs, up to :data:`MASKED_SIGNED_URLS_PER_PROCESS` per process (the
        masker's cost grows with the square of their number).

        :param uri: An ``s3://``, ``gs://`` or ``http(s)://`` URI.
        :param expires_in: Validity in seconds, clamped to 1 s .. 7 days (the S3 and GCS maximum).
        :return: The URL.
        :raises ValueError: For local paths and other schemes.
        :raises SigningError: When the ``gs://`` credentials cannot sign.
        """
        if is_http(uri):
            return uri
        if not is_remote_object(uri):
            raise ValueError(
                f"cannot make a URL for {uri!r}: expected an s3://, gs://, http:// or https:// URI"
            )
        seconds = int(min(max(expires_in, 1), MAX_SIGNED_URL_SECONDS))
        url = self._remote(uri_scheme(uri)).signed_url(uri, seconds)
        mask_signed_url(url)
        return url

    def check_writable(self, uri: str) -> None:
        """
        Check, before any work, that results can be written to ``uri``: its extra is installed and
        its bucket exists (``s3://``, ``gs://``), or it is a local path.

        :param uri: An ``s3://`` or ``gs://`` object URI, or a local path.
        :raises MissingExtraError: When the provider of the scheme is not installed.
        :raises ObjectNotFoundError: When the bucket does not exist.
        :raises ValueError: For ``http(s)://`` and other schemes, or a URI that names no object.
        """
        if is_local(uri):
            return
        scheme, bucket, _key = object_key(uri)
        backend = self._remote(scheme)
        backend.client()
        if not backend.bucket_exists(bucket):
            raise missing_bucket(bucket, uri)

    def check_exists(self, uri: str) -> None:
        """
        Check that an object exists.

        ``s3://`` and ``gs://`` objects are checked with a metadata request, local paths on disk;
        ``http(s)://`` URLs are not checked.

        :param uri: An ``s3://``, ``gs://`` or ``http(s)://`` URI, or a local path.
        :raises ObjectNotFoundError: Naming the URI; the message tells a missing bucket from a
            missing key.
        """
        if is_http(uri):
            return
        self._backend(uri, "s3://, gs://, http(s):// or a local path").check_exists(uri)

    def check_all_exist(self, uris: Sequence[str]) -> None:
        """
        Check that every object exists, remote ones :data:`EXISTENCE_CHECK_THREADS` at a time.

        :param uris: URIs and paths as accepted by :meth:`check_exists`.
        :raises ObjectNotFoundError: Listing the first :data:`MAX_LISTED_MISSING` missing URIs and how
            many are missing in all.
        """
        self._probe_all(uris, lambda uri: None if is_http(uri) else self._backend_fingerprint(uri))

    def fingerprints(self, uris: Sequence[str]) -> dict[str, str | None]:
        """
        Each image's fingerprint (:mod:`~airflow_provider_blip2.storage.fingerprints`), checking
        that every object and file exists; :data:`EXISTENCE_CHECK_THREADS` at a time.

        :param uris: ``s3://``, ``gs://`` or ``http(s)://`` URIs, local paths or ``file://`` URIs.
        :return: URI -> fingerprint; ``None`` for an http(s) URL that cannot be read.
        :raises ObjectNotFoundError: Listing the first :data:`MAX_LISTED_MISSING` missing objects.
        """
        return self._probe_all(uris, self.fingerprint)

    def fingerprint(self, uri: str) -> str | None:
        """
        One image's fingerprint: what changes when its content may have changed.

        :param uri: As accepted by :meth:`fingerprints`.
        :raises ObjectNotFoundError: When the object or file does not exist.
        """
        if is_http(uri):
            from airflow_provider_blip2.storage.fingerprints import http_fingerprint

            return http_fingerprint(uri)
        return self._backend_fingerprint(uri)

    def _backend_fingerprint(self, uri: str) -> str:
        return self._backend(uri, "s3://, gs://, http(s):// or a local path").fingerprint(uri)

    def _probe_all(self, uris: Sequence[str], probe: Callable[[str], str | None]) -> dict[str, str | None]:
        """Run ``probe`` on every URI (remote ones in threads); raise one error naming the missing."""
        unique = list(dict.fromkeys(uris))
        for uri in unique:
            if is_remote_object(uri) or not (is_http(uri) or is_local(uri)):
                # Reject bad URIs before any request, and create the clients outside the threads.
                scheme, _, _ = object_key(uri)
                self._client_for(scheme)
        found: dict[str, str | None] = {}
        absent: set[str] = set()

        def run(uri: str) -> None:
            try:
                found[uri] = probe(uri)
            except ObjectNotFoundError:
                absent.add(uri)

        for uri in unique:
            if is_local(uri):
                run(uri)
        remote = [uri for uri in unique if not is_local(uri)]
        if remote:
            with ThreadPoolExecutor(max_workers=min(EXISTENCE_CHECK_THREADS, len(remote))) as pool:
                list(pool.map(run, remote))
        if absent:
            raise _not_found([uri for uri in unique if uri in absent], len(unique))
        return {uri: found[uri] for uri in unique}

    def list_images(self, prefix: str, patterns: Sequence[str] = IMAGE_PATTERNS) -> list[str]:
        """
        List the objects under a prefix whose base name matches one of ``patterns``, recursively.

        The prefix is a plain key prefix, as in S3 and GCS: end it with ``/`` to list a folder.
        Folder placeholder objects (keys ending in ``/``) are skipped.

        :param prefix: ``s3://bucket/some/prefix/`` or ``gs://bucket/some/prefix/``.
        :param patterns: ``fnmatch`` globs matched case-insensitively against the base name.
        :return: The full URIs (``s3://bucket/key``), sorted; empty when nothing matches.
        :raises ObjectNotFoundError: When the bucket does not exist.
        """
        scheme, bucket, key_prefix = split_uri(prefix)
        lowered = [pattern.lower() for pattern in patterns]
        keys = self._remote(scheme).list_keys(bucket, key_prefix)
        return sorted(f"{scheme}://{bucket}/{key}" for key in keys if _is_match(key, lowered))

    def read_bytes(self, uri: str) -> bytes:
        """
        Read a whole object.

        :param uri: An ``s3://`` or ``gs://`` URI, a local path or a ``file://`` URI.
        :return: The content.
        :raises ObjectNotFoundError: When the object or its bucket does not exist.
        """
        return self._backend(uri, "s3://, gs://, a local path or file://").read_bytes(uri)

    def write_bytes(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """
        Write a whole object, replacing any existing one.

        :param uri: An ``s3://`` or ``gs://`` URI, a local path or a ``file://`` URI; missing parent
            directories of a local path are created.
        :param data: The content.
        :param content_type: The object's ``Content-Type`` (ignored for local files).
        :raises ObjectNotFoundError: When the bucket does not exist.
        """
        backend = self._backend(uri, "s3://, gs://, a local path or file://")
        backend.write_bytes(uri, data, content_type=content_type)

    def copy(self, source: str, destination: str) -> None:
        """
        Copy an object.

        Within S3 or within GCS the store copies server-side; otherwise the content is read and
        written (its content type is guessed from the destination name).

        :param source: An ``s3://`` or ``gs://`` URI, a local path or a ``file://`` URI.
        :param destination: Same choice as ``source``.
        :raises ObjectNotFoundError: When the source, or the destination bucket, does not exist.
        :raises ValueError: When source and destination are the same.
        """
        if source == destination:
            raise ValueError(f"cannot copy {source!r} onto itself")
        scheme = uri_scheme(source)
        if scheme in REMOTE_SCHEMES and scheme == uri_scheme(destination):
            self._remote(scheme).copy(source, destination)
            return
        content_type = mimetypes.guess_type(destination.rsplit("/", 1)[-1])[0] or "application/octet-stream"
        self.write_bytes(destination, self.read_bytes(source), content_type=content_type)

    def _backend(self, uri: str, expected: str) -> Backend:
        """The backend of a local path or an ``s3://`` / ``gs://`` URI; ValueError naming ``expected``."""
        if is_local(uri):
            return self._local
        if is_remote_object(uri):
            return self._remote(uri_scheme(uri))
        raise ValueError(f"unsupported URI {uri!r}: expected {expected}")

    def _remote(self, scheme: str) -> CloudBackend[Any]:
        """The backend of ``s3`` or ``gs``, made on first use."""
        with self._lock:
            if scheme not in self._remotes:
                self._remotes[scheme] = self._make_remote(scheme)
            return self._remotes[scheme]

    def _make_remote(self, scheme: str) -> CloudBackend[Any]:
        """A new backend of ``s3`` or ``gs``, on the connection of its store."""
        factories: dict[str, Callable[[], CloudBackend[Any]]] = {
            "s3": lambda: S3Backend(conn_id=self.aws_conn_id),
            "gs": lambda: GCSBackend(conn_id=self.gcp_conn_id),
        }
        if scheme not in factories:
            raise ValueError(f"no client for scheme {scheme!r}")
        return factories[scheme]()

    def _client_for(self, scheme: str) -> Any:
        """The boto3 S3 client or google-cloud-storage client of the scheme's backend, made once."""
        return self._remote(scheme).client()


def _is_match(key: str, patterns: Sequence[str]) -> bool:
    """Whether ``key`` names an object (not a folder) whose lower-cased base name matches a pattern."""
    name = key.rsplit("/", 1)[-1].lower()
    return not key.endswith("/") and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _not_found(missing: Sequence[str], checked: int) -> ObjectNotFoundError:
    """The error naming the first :data:`MAX_LISTED_MISSING` of ``missing`` among ``checked`` objects."""
    listed = ", ".join(missing[:MAX_LISTED_MISSING])
    extra = len(missing) - MAX_LISTED_MISSING
    more = f" and {extra} more" if extra > 0 else ""
    return ObjectNotFoundError(f"{len(missing)} of {checked} objects do not exist: {listed}{more}")
