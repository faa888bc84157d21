"""Files on the worker, named by plain paths or ``file://`` URIs."""

from __future__ import annotations

from airflow_provider_blip2.storage.base import Backend
from airflow_provider_blip2.storage.errors import missing_key
from airflow_provider_blip2.storage.uris import local_path


class LocalBackend(Backend):
    """
    Files on this machine, named by plain paths or ``file:///path/to/file`` URIs (host empty or
    ``localhost``). They have no buckets, are listed by no prefix and cannot be signed.
    """

    def check_exists(self, uri: str) -> None:
        """A directory, or nothing at all, is missing."""
        if not local_path(uri).is_file():
            raise missing_key(uri)

    def read_bytes(self, uri: str) -> bytes:
        """Read the file; a directory, or nothing at all, is missing."""
        try:
            return local_path(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise missing_key(uri) from None

    def write_bytes(self, uri: str, data: bytes, *, content_type: str) -> None:
        """Write the file, creating its missing parent directories; ``content_type`` is ignored."""
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
