"""``s3://`` objects, through the amazon provider's ``S3Hook``, which is imported on first use only."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from airflow_provider_blip2.storage.base import CloudBackend
from airflow_provider_blip2.storage.errors import StorageError, missing_bucket, missing_key
from airflow_provider_blip2.storage.uris import object_key, split_uri

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

_T = TypeVar("_T")


class S3Backend(CloudBackend["S3Hook"]):
    """
    Objects in S3, named ``s3://bucket/key``, through the amazon provider's ``S3Hook`` (the
    ``amazon`` extra) and its boto3 client.

    :param conn_id: The Airflow connection of type ``aws``.
    """

    scheme = "s3"
    extra = "amazon"
    _presign_hook_instance: S3Hook | None = None

    def bucket_exists(self, bucket: str) -> bool:
        """``HEAD`` the bucket: only a 404 or ``NoSuchBucket`` answer counts as missing."""
        from botocore.exceptions import ClientError

        try:
            self.client().head_bucket(Bucket=bucket)
        except ClientError as error:
            code, status = _error_code(error), _error_status(error)
            return not (code in ("404", "NoSuchBucket", "NotFound") or status == 404)
        return True

    def fingerprint(self, uri: str) -> str:
        """``HEAD`` the object: its ETag and size, ``s3:{etag}:{size}``."""
        _, bucket, key = object_key(uri)
        head = self._call(uri, lambda: self.client().head_object(Bucket=bucket, Key=key))
        return f"s3:{str(head.get('ETag', '')).strip(chr(34))}:{head.get('ContentLength', '')}"

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """List with ``ListObjectsV2``, page by page."""

        def list_all() -> list[str]:
            paginator = self.client().get_paginator("list_objects_v2")
            return [
                item["Key"]
                for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for item in page.get("Contents", ())
            ]

        return self._call(f"s3://{bucket}/{prefix}", list_all)

    def read_bytes(self, uri: str) -> bytes:
        """``GET`` the object and read its body."""
        _, bucket, key = object_key(uri)
        response = self._call(uri, lambda: self.client().get_object(Bucket=bucket, Key=key))
        return self._call(uri, response["Body"].read)

    def write_bytes(self, uri: str, data: bytes, *, content_type: str) -> None:
        """``PUT`` the object with its content type."""
        _, bucket, key = object_key(uri)
        self._call(
            uri,
            lambda: self.client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type),
        )

    def copy(self, source: str, destination: str) -> None:
        """``CopyObject``; the copy gets the destination bucket's default permissions."""
        _, source_bucket, source_key = object_key(source)
        _, destination_bucket, destination_key = object_key(destination)
        hook = self.hook()
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
            if not self.bucket_exists(destination_bucket):
                raise missing_bucket(destination_bucket, destination) from None
            code = _error_code(error)
            raise StorageError(f"{source} -> {destination}: {code}: {_error_message(error, code)}") from error

    def signed_url(self, uri: str, seconds: int) -> str:
        """Presign with Signature Version 4 (see :meth:`_presign_hook`); StorageError if it cannot."""
        _, bucket, key = object_key(uri)
        url = self._presign_hook().generate_presigned_url(
            "get_object", params={"Bucket": bucket, "Key": key}, expires_in=seconds
        )
        if not url:
            raise StorageError(f"cannot presign a URL for {uri} with connection {self.conn_id!r}")
        return url

    def _make_hook(self) -> S3Hook:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.conn_id)

    def _call(self, uri: str, call: Callable[[], _T]) -> _T:
        """Run an S3 request for ``uri``, translating botocore errors."""
        self.hook()  # MissingExtraError without the amazon provider, before botocore is imported
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as error:
            self._raise_error(uri, error)
        except BotoCoreError as error:
            raise StorageError(f"{uri}: {error}") from error

    def _raise_error(self, uri: str, error: Any) -> NoReturn:
        """Raise the StorageError of a botocore ``ClientError`` of a request for ``uri``."""
        code, status = _error_code(error), _error_status(error)
        _, bucket, _ = split_uri(uri)
        if code == "NoSuchBucket":
            raise missing_bucket(bucket, uri) from None
        if code == "NoSuchKey":
            raise missing_key(uri) from None
        if code in ("404", "NotFound") or status == 404:
            # HEAD responses have no body, so a missing bucket and a missing key look alike.
            if not self.bucket_exists(bucket):
                raise missing_bucket(bucket, uri) from None
            raise missing_key(uri) from None
        raise StorageError(f"{uri}: {code or status}: {_error_message(error, code)}") from error

    def _presign_hook(self) -> S3Hook:
        """
        The hook that presigns: the connection's, forced to Signature Version 4.

        Unless a signature version is configured, botocore presigns with the deprecated SigV2 in the
        older regions (us-east-1 among them), which buckets created since June 2020 reject. The
        connection's own ``config_kwargs`` are kept; an explicit ``signature_version`` in them wins.
        """
        hook = self.hook()
        with self._lock:
            if self._presign_hook_instance is None:
                self._presign_hook_instance = self._sigv4_hook(hook)
            return self._presign_hook_instance

    def _sigv4_hook(self, hook: S3Hook) -> S3Hook:
        """``hook`` itself when its config sets a signature version, else a copy of it set to SigV4."""
        from botocore.config import Config

        configured = hook.conn_config.botocore_config
        if configured is not None and configured.signature_version:
            return hook
        config = (configured or Config()).merge(Config(signature_version="s3v4"))
        return type(hook)(aws_conn_id=self.conn_id, config=config)


def _error_code(error: Any) -> str:
    """The ``Error.Code`` of a botocore ``ClientError``; ``""`` when it has none."""
    return str(error.response.get("Error", {}).get("Code", ""))


def _error_status(error: Any) -> Any:
    """The HTTP status of a botocore ``ClientError``; None when it has none."""
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _error_message(error: Any, code: str) -> Any:
    """The ``Error.Message`` of a botocore ``ClientError``, or ``code`` when it has none."""
    return error.response.get("Error", {}).get("Message") or code
