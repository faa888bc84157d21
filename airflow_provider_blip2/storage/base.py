"""
What the storage backends offer: :class:`Backend` for every scheme, :class:`CloudBackend` for the
cloud stores, whose provider hook is made on first use.

The abstract methods carry the contract; each backend's docstrings say only how it fulfils it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from airflow_provider_blip2.storage.errors import missing_extra


class Backend(ABC):
    """The operations on single objects, which local files, ``s3://`` and ``gs://`` all offer."""

    def check_exists(self, uri: str) -> None:
        """
        Check that an object exists (reading its fingerprint).

        :param uri: The object's URI or path.
        :raises ObjectNotFoundError: Naming the URI, and the bucket when it is the bucket that is missing.
        """
        self.fingerprint(uri)

    @abstractmethod
    def fingerprint(self, uri: str) -> str:
        """
        What tells this version of an object from another, read from its metadata alone.

        :param uri: The object's URI or path.
        :return: A string that changes whenever the object's content may have changed.
        :raises ObjectNotFoundError: When the object or its bucket does not exist.
        """

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """
        Read a whole object.

        :param uri: The object's URI or path.
        :return: The content.
        :raises ObjectNotFoundError: When the object or its bucket does not exist.
        """

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes, *, content_type: str) -> None:
        """
        Write a whole object, replacing any existing one.

        :param uri: The object's URI or path.
        :param data: The content.
        :param content_type: The object's ``Content-Type``, where the store keeps one.
        :raises ObjectNotFoundError: When the bucket does not exist.
        """


class _Connectable(Protocol):
    def get_conn(self) -> Any: ...


HookT = TypeVar("HookT", bound=_Connectable)


class CloudBackend(Backend, Generic[HookT]):
    """
    A cloud store of one URI scheme, through the hook of an Airflow provider that is an optional extra.

    The hook and its client are each made once, on first use, and then shared by all threads; the
    provider is imported only then, and :class:`~airflow_provider_blip2.storage.errors.MissingExtraError`
    names the extra to install when it is missing. The errors of the store's client library surface
    as :class:`~airflow_provider_blip2.storage.errors.StorageError`; a missing bucket or object as
    :class:`~airflow_provider_blip2.storage.errors.ObjectNotFoundError`, naming which is missing.

    :param conn_id: The Airflow connection the hook uses.
    """

    #: The URI scheme, e.g. ``"s3"``.
    scheme: ClassVar[str]
    #: The extra of this package that installs the provider, e.g. ``"amazon"``.
    extra: ClassVar[str]

    def __init__(self, *, conn_id: str) -> None:
        self.conn_id = conn_id
        self._lock = threading.Lock()
        self._hook: HookT | None = None
        self._client: Any = None

    def hook(self) -> HookT:
        """
        Return the provider's hook, made on first use.

        :return: The hook.
        :raises MissingExtraError: When the provider is not installed.
        """
        with self._lock:
            if self._hook is None:
                try:
                    self._hook = self._make_hook()
                except ImportError as error:
                    raise missing_extra(self.scheme, self.extra, error) from None
            return self._hook

    def client(self) -> Any:
        """
        Return the client of the hook (its ``get_conn()``), made on first use.

        :return: The client.
        :raises MissingExtraError: When the provider is not installed.
        """
        hook = self.hook()
        with self._lock:
            if self._client is None:
                self._client = hook.get_conn()
            return self._client

    @abstractmethod
    def _make_hook(self) -> HookT:
        """Import the provider and make the hook of the connection."""

    @abstractmethod
    def bucket_exists(self, bucket: str) -> bool:
        """
        Tell whether a bucket exists; no permission to check counts as existing.

        :param bucket: The bucket's name.
        :return: False only when the store says the bucket is missing.
        """

    @abstractmethod
    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """
        List the keys under a prefix, recursively, folder placeholders included.

        :param bucket: The bucket's name.
        :param prefix: A plain key prefix; ``""`` for the whole bucket.
        :return: The keys.
        :raises ObjectNotFoundError: When the bucket does not exist.
        """

    @abstractmethod
    def copy(self, source: str, destination: str) -> None:
        """
        Copy an object server-side, within this store.

        :param source: The URI of the object.
        :param destination: The URI of the copy.
        :raises ObjectNotFoundError: When the source, or the destination bucket, does not exist.
        """

    @abstractmethod
    def signed_url(self, uri: str, seconds: int) -> str:
        """
        Sign a GET URL of an object, without checking that it exists.

        :param uri: The URI of the object.
        :param seconds: The validity, already within the store's limits.
        :return: The signed URL.
        :raises SigningError: When the credentials cannot sign.
        """
