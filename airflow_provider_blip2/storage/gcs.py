"""``gs://`` objects, through the google provider's ``GCSHook``, which is imported on first use only."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_provider_blip2.storage.base import CloudBackend
from airflow_provider_blip2.storage.errors import (
    SigningError,
    StorageError,
    missing_bucket,
    missing_key,
)
from airflow_provider_blip2.storage.uris import object_key, split_uri

if TYPE_CHECKING:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

_T = TypeVar("_T")


class GCSBackend(CloudBackend["GCSHook"]):
    """
    Objects in Google Cloud Storage, named ``gs://bucket/object``, through the google provider's
    ``GCSHook`` (the ``google`` extra) and its google-cloud-storage client.

    :param conn_id: The Airflow connection of type ``google_cloud_platform``.
    """

    scheme = "gs"
    extra = "google"

    def bucket_exists(self, bucket: str) -> bool:
        """``Bucket.exists()``: any other API error (no permission, say) counts as existing."""
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return bool(self.client().bucket(bucket).exists())
        except GoogleAPICallError:
            return True

    def fingerprint(self, uri: str) -> str:
        """Reload the blob's metadata: its generation, ``gs:{generation}`` (new with every write)."""
        blob = self._blob(uri)
        self._call(uri, blob.reload)
        return f"gs:{blob.generation}"

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """List the blobs under the prefix, all pages."""
        client = self.client()
        uri = f"gs://{bucket}/{prefix}"
        return self._call(uri, lambda: [blob.name for blob in client.list_blobs(bucket, prefix=prefix)])

    def read_bytes(self, uri: str) -> bytes:
        """Download the blob."""
        return self._call(uri, self._blob(uri).download_as_bytes)

    def write_bytes(self, uri: str, data: bytes, *, content_type: str) -> None:
        """Upload the blob with its content type."""
        blob = self._blob(uri)
        self._call(uri, lambda: blob.upload_from_string(data, content_type=content_type))

    def copy(self, source: str, destination: str) -> None:
        """Rewrite the blob through the hook's ``copy``."""
        _, source_bucket, source_key = object_key(source)
        _, destination_bucket, destination_key = object_key(destination)
        hook = self.hook()
        from google.api_core.exceptions import GoogleAPICallError, NotFound

        try:
            hook.copy(source_bucket, source_key, destination_bucket, destination_key)
        except NotFound:
            # The source object, its bucket or the destination bucket: find out which.
            self.check_exists(source)
            raise missing_bucket(destination_bucket, destination) from None
        except GoogleAPICallError as error:
            raise StorageError(f"{source} -> {destination}: {error.code}: {error.message}") from error

    def signed_url(self, uri: str, seconds: int) -> str:
        """
        Sign a V4 GET URL.

        Credentials with a private key (a service-account key file) sign locally. Token-only
        credentials (Compute Engine, GKE workload identity) sign through the IAM ``signBlob`` API as
        their service account, which needs ``roles/iam.serviceAccountTokenCreator`` on itself.

        With ``STORAGE_EMULATOR_HOST`` set (a local emulator) the URL points at the emulator, which
        serves objects at ``/{bucket}/{object}`` - the path form of signed URLs - without checking
        the signature. Otherwise it points at the client's endpoint, ``https://storage.googleapis.com``.
        """
        _, bucket, key = object_key(uri)
        hook = self.hook()
        from google.auth.credentials import Signing

        blob = self.client().bucket(bucket).blob(key)
        credentials, _ = hook.get_credentials_and_project_id()
        options = _signing_options(seconds, credentials)
        if not isinstance(credentials, Signing):
            email, token = self._iam_signer(uri, credentials)
            options.update(service_account_email=email, access_token=token)
        try:
            return str(blob.generate_signed_url(**options))
        except Exception as error:
            raise self._signing_error(uri, credentials, error) from None

    def _make_hook(self) -> GCSHook:
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        return GCSHook(gcp_conn_id=self.conn_id)

    def _blob(self, uri: str) -> Any:
        """The google-cloud-storage blob of an object URI."""
        _, bucket, key = object_key(uri)
        return self.client().bucket(bucket).blob(key)

    def _call(self, uri: str, call: Callable[[], _T]) -> _T:
        """Run a GCS request for ``uri``, translating Google API errors."""
        self.hook()  # MissingExtraError without the google provider, before google.* is imported
        from google.api_core.exceptions import GoogleAPICallError, NotFound

        try:
            return call()
        except NotFound:
            _, bucket, _ = split_uri(uri)
            # GCS answers 404 for a missing bucket and a missing object alike.
            if not self.bucket_exists(bucket):
                raise missing_bucket(bucket, uri) from None
            raise missing_key(uri) from None
        except GoogleAPICallError as error:
            raise StorageError(f"{uri}: {error.code}: {error.message}") from error

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
        """The SigningError of ``credentials`` for ``uri``, naming the role that would let them sign."""
        reason = f": {type(error).__name__}: {error}" if error is not None else ""
        return SigningError(
            f"cannot sign a URL for {uri} with the credentials of connection {self.conn_id!r} "
            f"({type(credentials).__name__}): use a service-account key, or grant the service account "
            "roles/iam.serviceAccountTokenCreator on itself (permission iam.serviceAccounts.signBlob)"
            f"{reason}"
        )


def _signing_options(seconds: int, credentials: Any) -> dict[str, Any]:
    """The keyword arguments of ``Blob.generate_signed_url`` for a V4 GET URL valid ``seconds``."""
    options: dict[str, Any] = {
        "version": "v4",
        "expiration": timedelta(seconds=seconds),
        "method": "GET",
        "credentials": credentials,
    }
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        options["api_access_endpoint"] = emulator if "://" in emulator else f"http://{emulator}"
    return options
