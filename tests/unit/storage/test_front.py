"""
ObjectStorage on URIs that no backend handles, and the former import path.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import pytest

from airflow_provider_blip2.storage import ObjectStorage


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg?x=1", "http://127.0.0.1:1/cat.jpg"])
def test_signed_url_leaves_http_urls_unchanged(url: str) -> None:
    assert ObjectStorage().signed_url(url, expires_in=60) == url


@pytest.mark.parametrize("uri", ["/tmp/cat.jpg", "file:///tmp/cat.jpg", "ftp://host/cat.jpg"])
def test_signed_url_rejects_other_uris(uri: str) -> None:
    with pytest.raises(ValueError, match=r"s3://, gs://, http:// or https://") as excinfo:
        ObjectStorage().signed_url(uri, expires_in=60)
    assert uri in str(excinfo.value)
