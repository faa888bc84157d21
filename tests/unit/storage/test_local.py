"""
Local paths and file:// URIs, and the http(s):// URLs that are not checked.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from airflow_provider_blip2.storage import ObjectNotFoundError, ObjectStorage

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


def test_check_exists_http_and_local(tmp_path: Path) -> None:
    storage = ObjectStorage()
    storage.check_exists("https://127.0.0.1:1/not-checked.jpg")
    (tmp_path / "cat.jpg").write_bytes(JPEG)
    storage.check_exists(str(tmp_path / "cat.jpg"))
    storage.check_exists((tmp_path / "cat.jpg").as_uri())
    with pytest.raises(ObjectNotFoundError, match=re.escape(f"{tmp_path / 'dog.jpg'} does not exist")):
        storage.check_exists(str(tmp_path / "dog.jpg"))


def test_local_files(tmp_path: Path) -> None:
    storage = ObjectStorage()
    path = tmp_path / "a" / "b" / "cat.jpg"
    storage.write_bytes(str(path), JPEG)
    assert path.read_bytes() == JPEG
    assert storage.read_bytes(path.as_uri()) == JPEG
    storage.copy(str(path), (tmp_path / "copy" / "cat.jpg").as_uri())
    assert (tmp_path / "copy" / "cat.jpg").read_bytes() == JPEG
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="https://"):
        storage.read_bytes("https://example.com/cat.jpg")
