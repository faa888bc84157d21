"""Unit tests of the client's upload rules: which images are uploaded, checks, retention, presign answers.

Starts nothing (no server, no Airflow); files are written under pytest's temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_blip2.client.errors import Blip2InputError, Blip2ProtocolError
from airflow_provider_blip2.client.uploads import (
    MAX_RETENTION,
    MIN_RETENTION,
    RETENTION_MARGIN,
    check_image_file,
    local_path,
    parse_presign_response,
    presign_request,
    retention_seconds,
    sniff_image_type,
    transfer_for,
)
from tests.unit.client.helpers import response

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32
WEBP = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 32


@pytest.mark.parametrize(
    ("mode", "uri", "transfer"),
    [
        ("auto", "/data/cat.jpg", "upload"),
        ("auto", "file:///data/cat.jpg", "upload"),
        ("auto", "relative/cat.jpg", "upload"),
        ("auto", "https://cdn.example.com/cat.jpg", "url"),
        ("auto", "s3://bucket/cat.jpg", "url"),
        ("upload", "https://intranet.local/cat.jpg", "upload"),
        ("upload", "gs://bucket/cat.jpg", "upload"),
        ("url", "https://cdn.example.com/cat.jpg", "url"),
    ],
)
def test_which_images_are_uploaded(mode: str, uri: str, transfer: str) -> None:
    assert transfer_for(mode, uri) == transfer


def test_a_local_file_with_url_transfer_and_an_unknown_mode_are_refused_with_the_fix() -> None:
    with pytest.raises(
        Blip2InputError, match=r"images: '/data/cat.jpg' is a local file.*image_transfer='upload'"
    ):
        transfer_for("url", "/data/cat.jpg", field_name="images")
    with pytest.raises(Blip2InputError, match="image_transfer must be one of auto, url, upload"):
        transfer_for("ftp", "/data/cat.jpg")


def test_file_uris_name_local_paths_and_urls_do_not() -> None:
    assert local_path("file:///data/my%20cat.jpg") == Path("/data/my cat.jpg")
    assert local_path("file://localhost/data/cat.jpg") == Path("/data/cat.jpg")
    assert local_path("https://example.com/cat.jpg") is None
    with pytest.raises(Blip2InputError, match="names another host"):
        local_path("file://fileserver/data/cat.jpg")


@pytest.mark.parametrize(
    ("head", "content_type"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (WEBP, "image/webp"),
        (b"GIF89a" + b"\x00" * 16, "image/gif"),
        (b"%PDF-1.7" + b"\x00" * 16, None),
    ],
)
def test_images_are_told_by_their_first_bytes(head: bytes, content_type: str | None) -> None:
    assert sniff_image_type(head) == content_type


def test_a_file_to_upload_is_checked_before_any_request(tmp_path: Path) -> None:
    image = tmp_path / "cat.bin"
    image.write_bytes(PNG)
    assert check_image_file(image) == (len(PNG), "image/png")
    with pytest.raises(Blip2InputError, match=r"image: '.*missing.jpg' does not exist"):
        check_image_file(tmp_path / "missing.jpg")
    with pytest.raises(Blip2InputError, match="not a file"):
        check_image_file(tmp_path)
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(Blip2InputError, match="is not a jpeg, png, webp or gif image"):
        check_image_file(tmp_path / "notes.jpg", field_name="images")


def test_the_retention_is_the_timeout_plus_a_margin_within_the_api_bounds() -> None:
    assert retention_seconds(600) == 600 + RETENTION_MARGIN
    assert retention_seconds(0) >= MIN_RETENTION
    assert retention_seconds(600, 7200) == 7200
    for wrong in (10, MAX_RETENTION + 1):
        with pytest.raises(Blip2InputError, match="upload_retention must be between 60 s"):
            retention_seconds(600, wrong)


def test_a_presign_asks_for_an_image_kept_as_briefly_as_asked() -> None:
    request = presign_request("image/png", 1500)
    assert (request.method, request.path, request.creates) == ("POST", "/v1/upload/presign", False)
    assert request.json_body == {
        "content_type": "image/png",
        "file_type": "image",
        "expires_in_seconds": 1500,
    }


def test_a_presign_answer_gives_the_urls_the_headers_and_the_expiry() -> None:
    answer = response(
        200,
        {
            "id": "u-1",
            "presigned_url": "https://uploads.example.com/u-1?X-Amz-Signature=abc",
            "public_url": "https://files.example.com/u-1.png",
            "expires_at": "2026-12-06T12:00:00Z",
            "required_headers": {"x-amz-meta-file-id": "u-1"},
        },
    )
    upload = parse_presign_response(answer, retention=2 * 10**9, now=0)
    assert upload.public_url == "https://files.example.com/u-1.png"
    assert upload.expires_at == pytest.approx(1796558400.0)
    assert upload.put_headers("image/png", 42) == {
        "x-amz-meta-file-id": "u-1",
        "Content-Type": "image/png",
        "Content-Length": "42",
    }
    assert "X-Amz-Signature" not in repr(upload)
    without_expiry = response(200, {"presigned_url": "https://u/1?s=1", "public_url": "https://f/1"})
    assert parse_presign_response(without_expiry, retention=1500, now=1000.0).expires_at == 2500.0
    with pytest.raises(Blip2ProtocolError, match="no presigned_url and public_url"):
        parse_presign_response(response(200, {"id": "u-2"}), retention=60, now=0)
