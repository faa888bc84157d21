"""
One interface over ``s3://``, ``gs://``, local paths and ``http(s)://`` URLs, for the Airflow worker.

``s3://`` goes through the amazon provider's ``S3Hook`` and ``gs://`` through the google provider's
``GCSHook``. Both providers are optional extras, imported on first use only: importing this module
loads nothing but the standard library, so a deployment that only captions ``https://`` images
needs neither boto3 nor the Google client libraries.
"""

from __future__ import annotations

import fnmatch
import mimetypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from airflow_provider_blip2.storage.errors import (
    MissingExtraError,
    ObjectNotFoundError,
    SigningError,
    StorageError,
    missing_bucket,
    missing_extra,
    missing_key,
)
from airflow_provider_blip2.storage.masking import MASKED_SIGNED_URLS_PER_PROCESS, mask_signed_url
from airflow_provider_blip2.storage.uris import (
    HTTP_SCHEMES,
    REMOTE_SCHEMES,
    is_local,
    is_remote_object,
    local_path,
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

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

#: Glob patterns of the image files :meth:`ObjectStorage.list_images` keeps by default.
IMAGE_PATTERNS: tuple[str, ...] = ("*.jpg", "*.jpeg", "*.png", "*.webp")
#: The longest validity S3 and GCS accept for a signed URL: 7 days.
MAX_SIGNED_URL_SECONDS = 7 * 24 * 3600
#: Threads :meth:`ObjectStorage.check_all_exist` uses for remote objects.
EXISTENCE_CHECK_THREADS = 8
#: How many missing URIs an error message lists.
MAX_LISTED_MISSING = 10

_EXTRAS = {"s3": "amazon", "gs": "google"}
_T = TypeVar("_T")


class ObjectStorage:
    """
    Read, write, list, check and sign objects in S3, GCS, local files and HTTP(S) URLs.

    ``s3://`` needs the ``amazon`` extra, ``gs://`` the ``google`` extra; hooks and clients are created
    on first use and reused. Errors of the cloud libraries surface as :class:`StorageError`
    subclasses: :class:`ObjectNotFoundError` names the missing object or bucket,
    :class:`MissingExtraError` the extra to install. No error message contains a signed URL.

    :param aws_conn_id: The Airflow connection of type ``aws`` used for ``s3://`` URIs.
    :param gcp_conn_id: The Airflow connection of type ``google_cloud_platform`` used for ``gs://`` URIs.
    """

    def __init__(
        self, *, aws_conn_id: str = "aws_default", gcp_conn_id: str = "google_cloud_default"
    ) -> None:
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self._lock = threading.Lock()
        self._hooks: dict[str, Any] = {}
        self._clients: dict[str, Any] = {}
        self._s3_presign_hook_instance: S3Hook | None = None

    # ----------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------

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
        scheme = uri_scheme(uri)
        if scheme in HTTP_SCHEMES:
            return uri
        if scheme not in REMOTE_SCHEMES:
            raise ValueError(
                f"cannot make a URL for {uri!r}: expected an s3://, gs://, http:// or https:// URI"
            )
        seconds = int(min(max(expires_in, 1), MAX_SIGNED_URL_SECONDS))
        url = self._s3_signed_url(uri, seconds) if scheme == "s3" else self._gcs_signed_url(uri, seconds)
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
        self._client_for(scheme)
        exists = self._s3_bucket_exists(bucket) if scheme == "s3" else self._gcs_bucket_exists(bucket)
        if not exists:
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
        scheme = uri_scheme(uri)
        if scheme in HTTP_SCHEMES:
            return
        if is_local(uri):
            if not local_path(uri).is_file():
                raise missing_key(uri)
            return
        if scheme == "s3":
            self._s3_check_exists(uri)
        elif scheme == "gs":
            self._gcs_check_exists(uri)
        else:
            raise ValueError(f"unsupported URI {uri!r}: expected s3://, gs://, http(s):// or a local path")

    def check_all_exist(self, uris: Sequence[str]) -> None:
        """
        Check that every object exists, remote ones :data:`EXISTENCE_CHECK_THREADS` at a time.

        :param uris: URIs and paths as accepted by :meth:`check_exists`.
        :raises ObjectNotFoundError: Listing the first :data:`MAX_LISTED_MISSING` missing URIs and how
            many are missing in all.
        """
        unique = list(dict.fromkeys(uris))
        for uri in unique:
            if not (uri_scheme(uri) in HTTP_SCHEMES or is_local(uri)):
                # Reject bad URIs before any request, and create the clients outside the threads.
                object_key(uri)
                self._client_for(uri_scheme(uri))

        def missing(uri: str) -> bool:
            try:
                self.check_exists(uri)
            except ObjectNotFoundError:
                return True
            return False

        remote = [uri for uri in unique if is_remote_object(uri)]
        absent: set[str] = {uri for uri in unique if not is_remote_object(uri) and missing(uri)}
        if remote:
            with ThreadPoolExecutor(max_workers=min(EXISTENCE_CHECK_THREADS, len(remote))) as pool:
                gone = pool.map(missing, remote)
                absent.update(uri for uri, is_missing in zip(remote, gone, strict=True) if is_missing)
        if absent:
            ordered = [uri for uri in unique if uri in absent]
            listed = ", ".join(ordered[:MAX_LISTED_MISSING])
            extra = len(ordered) - MAX_LISTED_MISSING
            more = f" and {extra} more" if extra > 0 else ""
            raise ObjectNotFoundError(f"{len(ordered)} of {len(unique)} objects do not exist: {listed}{more}")

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
        keys = self._s3_list(bucket, key_prefix) if scheme == "s3" else self._gcs_list(bucket, key_prefix)
        return sorted(
            f"{scheme}://{bucket}/{key}"
            for key in keys
            if not key.endswith("/")
            and any(fnmatch.fnmatchcase(key.rsplit("/", 1)[-1].lower(), pattern) for pattern in lowered)
        )

    def read_bytes(self, uri: str) -> bytes:
        """
        Read a whole object.

        :param uri: An ``s3://`` or ``gs://`` URI, a local path or a ``file://`` URI.
        :return: The content.
        :raises ObjectNotFoundError: When the object or its bucket does not exist.
        """
        if is_local(uri):
            try:
                return local_path(uri).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise missing_key(uri) from None
        scheme, bucket, key = self._remote_object(uri)
        if scheme == "s3":
            response = self._s3_call(uri, lambda: self._client_for("s3").get_object(Bucket=bucket, Key=key))
            return self._s3_call(uri, response["Body"].read)
        blob = self._client_for("gs").bucket(bucket).blob(key)
        return self._gcs_call(uri, blob.download_as_bytes)

    def write_bytes(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """
        Write a whole object, replacing any existing one.

        :param uri: An ``s3://`` or ``gs://`` URI, a local path or a ``file://`` URI; missing parent
            directories of a local path are created.
        :param data: The content.
        :param content_type: The object's ``Content-Type`` (ignored for local files).
        :raises ObjectNotFoundError: When the bucket does not exist.
        """
        if is_local(uri):
            path = local_path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        scheme, bucket, key = self._remote_object(uri)
        if scheme == "s3":
            self._s3_call(
                uri,
                lambda: self._client_for("s3").put_object(
                    Bucket=bucket, Key=key, Body=data, ContentType=content_type
                ),
            )
            return
        blob = self._client_for("gs").bucket(bucket).blob(key)
        self._gcs_call(uri, lambda: blob.upload_from_string(data, content_type=content_type))

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
            _, source_bucket, source_key = object_key(source)
            _, destination_bucket, destination_key = object_key(destination)
            if scheme == "s3":
                self._s3_copy(
                    source, destination, source_bucket, source_key, destination_bucket, destination_key
                )
            else:
                self._gcs_copy(
                    source, destination, source_bucket, source_key, destination_bucket, destination_key
                )
            return
        content_type = mimetypes.guess_type(destination.rsplit("/", 1)[-1])[0] or "application/octet-stream"
        self.write_bytes(destination, self.read_bytes(source), content_type=content_type)

    # ----------------------------------------------------------------------------------------------
    # Shared helpers
    # ----------------------------------------------------------------------------------------------

    def _remote_object(self, uri: str) -> tuple[str, str, str]:
        if not is_remote_object(uri):
            raise ValueError(f"unsupported URI {uri!r}: expected s3://, gs://, a local path or file://")
        return object_key(uri)

    def _hook(self, scheme: str) -> Any:
        """The provider hook of ``s3`` or ``gs``, made on first use; MissingExtraError without it."""
        with self._lock:
            if scheme not in self._hooks:
                try:
                    if scheme == "s3":
                        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

                        self._hooks[scheme] = S3Hook(aws_conn_id=self.aws_conn_id)
                    elif scheme == "gs":
                        from airflow.providers.google.cloud.hooks.gcs import GCSHook

                        self._hooks[scheme] = GCSHook(gcp_conn_id=self.gcp_conn_id)
                    else:
                        raise ValueError(f"no client for scheme {scheme!r}")
                except ImportError as error:
                    raise missing_extra(scheme, _EXTRAS[scheme], error) from None
            return self._hooks[scheme]

    def _client_for(self, scheme: str) -> Any:
        """The boto3 S3 client or google-cloud-storage client of the scheme's hook, made once."""
        hook = self._hook(scheme)
        with self._lock:
            if scheme not in self._clients:
                self._clients[scheme] = hook.get_conn()
            return self._clients[scheme]

    # ----------------------------------------------------------------------------------------------
    # S3
    # ----------------------------------------------------------------------------------------------

    def _s3_call(self, uri: str, call: Callable[[], _T]) -> _T:
        """Run an S3 request for ``uri``, translating botocore errors."""
        self._hook("s3")  # MissingExtraError without the amazon provider, before botocore is imported
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as error:
            self._raise_s3_error(uri, error)
        except BotoCoreError as error:
            raise StorageError(f"{uri}: {error}") from error

    def _raise_s3_error(self, uri: str, error: Any) -> NoReturn:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        _, bucket, _ = split_uri(uri)
        if code == "NoSuchBucket":
            raise missing_bucket(bucket, uri) from None
        if code == "NoSuchKey":
            raise missing_key(uri) from None
        if code in ("404", "NotFound") or status == 404:
            # HEAD responses have no body, so a missing bucket and a missing key look alike.
            if not self._s3_bucket_exists(bucket):
                raise missing_bucket(bucket, uri) from None
            raise missing_key(uri) from None
        message = error.response.get("Error", {}).get("Message") or code
        raise StorageError(f"{uri}: {code or status}: {message}") from error

    def _s3_bucket_exists(self, bucket: str) -> bool:
        """False only when S3 says the bucket is missing (no permission to check counts as present)."""
        from botocore.exceptions import ClientError

        try:
            self._client_for("s3").head_bucket(Bucket=bucket)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return not (code in ("404", "NoSuchBucket", "NotFound") or status == 404)
        return True

    def _s3_presign_hook(self) -> S3Hook:
        """
        The hook that presigns: the connection's, forced to Signature Version 4.

        Unless a signature version is configured, botocore presigns with the deprecated SigV2 in the
        older regions (us-east-1 among them), which buckets created since June 2020 reject. The
        connection's own ``config_kwargs`` are kept; an explicit ``signature_version`` in them wins.
        """
        hook = self._hook("s3")
        with self._lock:
            if self._s3_presign_hook_instance is None:
                from botocore.config import Config

                configured = hook.conn_config.botocore_config
                if configured is not None and configured.signature_version:
                    self._s3_presign_hook_instance = hook
                else:
                    config = (configured or Config()).merge(Config(signature_version="s3v4"))
                    self._s3_presign_hook_instance = type(hook)(aws_conn_id=self.aws_conn_id, config=config)
            return self._s3_presign_hook_instance

    def _s3_signed_url(self, uri: str, seconds: int) -> str:
        _, bucket, key = object_key(uri)
        url = self._s3_presign_hook().generate_presigned_url(
            "get_object", params={"Bucket": bucket, "Key": key}, expires_in=seconds
        )
        if not url:
            raise StorageError(f"cannot presign a URL for {uri} with connection {self.aws_conn_id!r}")
        return url

    def _s3_check_exists(self, uri: str) -> None:
        _, bucket, key = object_key(uri)
        self._s3_call(uri, lambda: self._client_for("s3").head_object(Bucket=bucket, Key=key))

    def _s3_list(self, bucket: str, prefix: str) -> list[str]:
        uri = f"s3://{bucket}/{prefix}"

        def list_all() -> list[str]:
            paginator = self._client_for("s3").get_paginator("list_objects_v2")
            return [
                item["Key"]
                for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for item in page.get("Contents", ())
            ]

        return self._s3_call(uri, list_all)

    def _s3_copy(
        self,
        source: str,
        destination: str,
        source_bucket: str,
        source_key: str,
        destination_bucket: str,
        destination_key: str,
    ) -> None:
        hook = self._hook("s3")
        from airflow.providers.amazon.aws.hooks.s3 import NO_ACL
        from botocore.exceptions import ClientError

        try:
            # NO_ACL: the copy gets the destination bucket's default permissions, which also works
            # for buckets whose ACLs are disabled (object ownership "bucket owner enforced").
            hook.copy_object(
                source_bucket_key=source_key,
                dest_bucket_key=destination_key,
                source_bucket_name=source_bucket,
                dest_bucket_name=destination_bucket,
                acl_policy=NO_ACL,
            )
        except ClientError as error:
            # The source object, its bucket or the destination bucket may be missing: find out which.
            self.check_exists(source)
            if not self._s3_bucket_exists(destination_bucket):
                raise missing_bucket(destination_bucket, destination) from None
            code = error.response.get("Error", {}).get("Code", "")
            message = error.response.get("Error", {}).get("Message") or code
            raise StorageError(f"{source} -> {destination}: {code}: {message}") from error

    # ----------------------------------------------------------------------------------------------
    # GCS
    # ----------------------------------------------------------------------------------------------

    def _gcs_call(self, uri: str, call: Callable[[], _T]) -> _T:
        """Run a GCS request for ``uri``, translating Google API errors."""
        self._hook("gs")  # MissingExtraError without the google provider, before google.* is imported
        from google.api_core.exceptions import GoogleAPICallError, NotFound

        try:
            return call()
        except NotFound:
            _, bucket, _ = split_uri(uri)
            # GCS answers 404 for a missing bucket and a missing object alike.
            if not self._gcs_bucket_exists(bucket):
                raise missing_bucket(bucket, uri) from None
            raise missing_key(uri) from None
        except GoogleAPICallError as error:
            raise StorageError(f"{uri}: {error.code}: {error.message}") from error

    def _gcs_bucket_exists(self, bucket: str) -> bool:
        """False only when GCS says the bucket is missing (no permission to check counts as present)."""
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return bool(self._client_for("gs").bucket(bucket).exists())
        except GoogleAPICallError:
            return True

    def _gcs_check_exists(self, uri: str) -> None:
        _, bucket, key = object_key(uri)
        blob = self._client_for("gs").bucket(bucket).blob(key)
        self._gcs_call(uri, blob.reload)

    def _gcs_list(self, bucket: str, prefix: str) -> list[str]:
        uri = f"gs://{bucket}/{prefix}"
        client = self._client_for("gs")
        return self._gcs_call(uri, lambda: [blob.name for blob in client.list_blobs(bucket, prefix=prefix)])

    def _gcs_copy(
        self,
        source: str,
        destination: str,
        source_bucket: str,
        source_key: str,
        destination_bucket: str,
        destination_key: str,
    ) -> None:
        hook = self._hook("gs")
        from google.api_core.exceptions import GoogleAPICallError, NotFound

        try:
            hook.copy(source_bucket, source_key, destination_bucket, destination_key)
        except NotFound:
            # The source object, its bucket or the destination bucket: find out which.
            self.check_exists(source)
            raise missing_bucket(destination_bucket, destination) from None
        except GoogleAPICallError as error:
            raise StorageError(f"{source} -> {destination}: {error.code}: {error.message}") from error

    def _gcs_signed_url(self, uri: str, seconds: int) -> str:
        """
        A V4 signed GET URL.

        Credentials with a private key (a service-account key file) sign locally. Token-only
        credentials (Compute Engine, GKE workload identity) sign through the IAM ``signBlob`` API as
        their service account, which needs ``roles/iam.serviceAccountTokenCreator`` on itself.

        With ``STORAGE_EMULATOR_HOST`` set (a local emulator) the URL points at the emulator, which
        serves objects at ``/{bucket}/{object}`` - the path form of signed URLs - without checking
        the signature. Otherwise it points at the client's endpoint, ``https://storage.googleapis.com``.
        """
        _, bucket, key = object_key(uri)
        hook = self._hook("gs")
        from google.auth.credentials import Signing

        blob = self._client_for("gs").bucket(bucket).blob(key)
        credentials, _ = hook.get_credentials_and_project_id()
        options: dict[str, Any] = {
            "version": "v4",
            "expiration": timedelta(seconds=seconds),
            "method": "GET",
            "credentials": credentials,
        }
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            options["api_access_endpoint"] = emulator if "://" in emulator else f"http://{emulator}"
        if isinstance(credentials, Signing):
            try:
                return str(blob.generate_signed_url(**options))
            except Exception as error:
                raise self._signing_error(uri, credentials, error) from None
        email, token = self._iam_signer(uri, credentials)
        try:
            return str(blob.generate_signed_url(**options, service_account_email=email, access_token=token))
        except Exception as error:
            raise self._signing_error(uri, credentials, error) from None

    def _iam_signer(self, uri: str, credentials: Any) -> tuple[str, str]:
        """The service account and fresh access token to sign with through IAM ``signBlob``."""
        if not hasattr(credentials, "service_account_email"):
            raise self._signing_error(uri, credentials, None)
        try:
            from google.auth.transport.requests import Request

            credentials.refresh(Request())
        except Exception as error:
            raise self._signing_error(uri, credentials, error) from None
        email = getattr(credentials, "service_account_email", None)
        token = getattr(credentials, "token", None)
        if not email or email == "default" or not token:
            raise self._signing_error(uri, credentials, None)
        return str(email), str(token)

    def _signing_error(self, uri: str, credentials: Any, error: Exception | None) -> SigningError:
        reason = f": {type(error).__name__}: {error}" if error is not None else ""
        return SigningError(
            f"cannot sign a URL for {uri} with the credentials of connection {self.gcp_conn_id!r} "
            f"({type(credentials).__name__}): use a service-account key, or grant the service account "
            "roles/iam.serviceAccountTokenCreator on itself (permission iam.serviceAccounts.signBlob)"
            f"{reason}"
        )
