"""Files on the worker, named by plain paths or ``file://`` URIs."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from airflow_provider_blip2.storage.base import Backend
from airflow_provider_blip2.storage.errors import missing_key
from airflow_provider_blip2.storage.uris import local_path


class LocalBackend(Backend):
    """
    Files on this machine, named by plain paths or ``file:///path/to/file`` URIs (host empty or
    ``localhost``). They have no buckets, are listed by no prefix and cannot be signed.
    """

    def fingerprint(self, uri: str) -> str:
        """The file's size and modification time (nanoseconds): ``file:{size}:{mtime_ns}``."""
        try:
            info = local_path(uri).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise missing_key(uri) from None
        if not stat.S_ISREG(info.st_mode):
            raise missing_key(uri)
        return f"file:{info.st_size}:{info.st_mtime_ns}"

    def read_bytes(self, uri: str) -> bytes:
        """Read the file; a directory, or nothing at all, is missing."""
        try:
            return local_path(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise missing_key(uri) from None

    def write_bytes(self, uri: str, data: bytes, *, content_type: str) -> None:
        """
        Write the file atomically (a new file renamed over the old one), creating its missing parent
        directories; ``content_type`` is ignored. A crash leaves the old file or the new one, never
        a part.
        """
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)  # noqa: SIM115
        try:
            with handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
