"""The errors of object storage, and the messages every backend words alike."""

from __future__ import annotations


class StorageError(Exception):
    """An object store operation failed."""


class ObjectNotFoundError(StorageError):
    """The object, or its bucket, does not exist."""


class MissingExtraError(StorageError):
    """The provider package a URI scheme needs is not installed."""


class SigningError(StorageError):
    """The connection's credentials cannot sign a URL."""


def missing_key(uri: str) -> ObjectNotFoundError:
    """
    Make the error for an object that does not exist in an existing bucket (or a missing file).

    :param uri: The URI or path of the object.
    :return: The error, to raise.
    """
    return ObjectNotFoundError(f"{uri} does not exist")


def missing_bucket(bucket: str, uri: str) -> ObjectNotFoundError:
    """
    Make the error for a bucket that does not exist.

    :param bucket: The name of the bucket.
    :param uri: The URI that names an object in it.
    :return: The error, to raise.
    """
    return ObjectNotFoundError(f"bucket {bucket!r} does not exist ({uri})")


def missing_extra(scheme: str, extra: str, error: ImportError) -> MissingExtraError:
    """
    Make the error for a URI scheme whose provider package is not installed.

    :param scheme: The URI scheme, e.g. ``"s3"``.
    :param extra: The extra of this package that installs the provider, e.g. ``"amazon"``.
    :param error: The import error, quoted in the message.
    :return: The error, to raise ``from None``.
    """
    return MissingExtraError(
        f"{scheme}:// URIs need the {extra} provider: pip install 'airflow-provider-blip2[{extra}]' ({error})"
    )
