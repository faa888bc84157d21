"""
ObjectStorage against a real local S3 (moto) and GCS (gcp-storage-emulator).

Starts: a local S3 (moto), a local GCS (gcp-storage-emulator), and the emulator's file serving.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import pytest
import requests

from airflow_provider_blip2.storage import (
    IMAGE_PATTERNS,
    MAX_SIGNED_URL_SECONDS,
    ObjectNotFoundError,
    ObjectStorage,
    SigningError,
    masking,
)

if TYPE_CHECKING:
    from scripts.storage_servers import LocalGcs, LocalS3

BUCKET = "blip2-images"
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
SIGNATURE_PARAMETERS = ("X-Amz-Signature", "X-Goog-Signature")


class _Server(Protocol):
    def create_bucket(self, name: str) -> None: ...

    def put_object(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...


@dataclass
class Remote:
    """One of the two local object stores, with its connection configured."""

    scheme: str
    server: _Server

    def uri(self, key: str, bucket: str = BUCKET) -> str:
        return f"{self.scheme}://{bucket}/{key}"


@pytest.fixture(params=["s3", "gs"])
def remote(request: pytest.FixtureRequest) -> Remote:
    """Each store in turn, empty but for the bucket ``BUCKET``."""
    fixture = "s3_connection" if request.param == "s3" else "gcs_connection"
    server: _Server = request.getfixturevalue(fixture)
    server.create_bucket(BUCKET)
    return Remote(request.param, server)


# --------------------------------------------------------------------------------------------------
# Signed URLs
# --------------------------------------------------------------------------------------------------


def test_signed_url_downloads_the_object(remote: Remote) -> None:
    remote.server.put_object(BUCKET, "photos/a cat+dog.jpg", JPEG, "image/jpeg")
    url = ObjectStorage().signed_url(remote.uri("photos/a cat+dog.jpg"), expires_in=300)

    query = parse_qs(urlsplit(url).query)
    expires = "X-Amz-Expires" if remote.scheme == "s3" else "X-Goog-Expires"
    assert query[expires] == ["300"]
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == JPEG


def test_s3_url_is_signed_with_sigv4_by_the_connection_key(s3_connection: LocalS3) -> None:
    """Moto does not check signatures, so check the AWS Signature Version 4 here."""
    url = ObjectStorage().signed_url(f"s3://{BUCKET}/photos/a cat+dog.jpg", expires_in=120)
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature")
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    access_key, date, region, service, _ = params["X-Amz-Credential"].split("/")
    assert (access_key, region, service) == ("testing", "us-east-1", "s3")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical_request = f"GET\n{parts.path}\n{canonical_query}\nhost:{parts.netloc}\n\nhost\nUNSIGNED-PAYLOAD"
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = b"AWS4" + b"testing"
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    assert hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest() == signature


def test_gcs_url_is_signed_by_the_service_account_key(gcs_connection: LocalGcs) -> None:
    """The emulator does not check signatures, so check the GCS V4 signature with the key's public half."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    url = ObjectStorage().signed_url(f"gs://{BUCKET}/photos/a cat+dog.jpg", expires_in=120)
    parts = urlsplit(url)
    # The URL is the canonical query string followed by the signature.
    canonical_query, signature = parts.query.split("&X-Goog-Signature=")
    params = dict(parse_qsl(canonical_query))
    email, scope = params["X-Goog-Credential"].split("/", 1)
    assert email == gcs_connection.service_account_key["client_email"]
    canonical_request = f"GET\n{parts.path}\n{canonical_query}\nhost:{parts.netloc}\n\nhost\nUNSIGNED-PAYLOAD"
    string_to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            params["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    private_key = serialization.load_pem_private_key(
        gcs_connection.service_account_key["private_key"].encode(), password=None
    )
    assert isinstance(private_key, rsa.RSAPrivateKey)
    private_key.public_key().verify(
        bytes.fromhex(signature), string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256()
    )


@pytest.mark.parametrize(("requested", "granted"), [(10**9, MAX_SIGNED_URL_SECONDS), (0, 1), (59.9, 59)])
def test_signed_url_validity_is_clamped(remote: Remote, requested: float, granted: int) -> None:
    url = ObjectStorage().signed_url(remote.uri("any.jpg"), expires_in=requested)
    expires = "X-Amz-Expires" if remote.scheme == "s3" else "X-Goog-Expires"
    assert parse_qs(urlsplit(url).query)[expires] == [str(granted)]


def test_signed_url_is_masked_in_logs(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.common.compat.sdk import redact

    # The process's earlier tests may have used up its bound of masked URLs.
    monkeypatch.setattr(masking, "_masked_signed_urls", 0)
    url = ObjectStorage().signed_url(remote.uri("secret.jpg"), expires_in=60)
    assert url not in str(redact(f"downloading {url}"))


def test_signed_url_of_gcs_emulator_points_at_the_emulator(gcs_connection: LocalGcs) -> None:
    url = ObjectStorage().signed_url("gs://bucket/photos/cat.jpg", expires_in=60)
    assert url.startswith(f"{gcs_connection.endpoint}/bucket/photos/cat.jpg?")


def test_signed_url_not_in_error_messages(remote: Remote) -> None:
    storage = ObjectStorage()
    uri = remote.uri("never-uploaded.jpg")
    url = storage.signed_url(uri, expires_in=60)
    with pytest.raises(ObjectNotFoundError) as excinfo:
        storage.check_all_exist([url, uri])
    message = str(excinfo.value)
    assert uri in message
    assert url not in message
    assert not any(parameter in message for parameter in SIGNATURE_PARAMETERS)


def test_gcs_signing_with_anonymous_credentials(
    gcs_connection: LocalGcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    anonymous = {
        "conn_type": "google_cloud_platform",
        "extra": {"is_anonymous": True, "project": "test-project"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps(anonymous))
    gcs_connection.create_bucket(BUCKET)
    gcs_connection.put_object(BUCKET, "cat.jpg", JPEG)
    storage = ObjectStorage()
    # Anonymous credentials read the emulator, but cannot sign.
    assert storage.read_bytes(f"gs://{BUCKET}/cat.jpg") == JPEG
    with pytest.raises(SigningError) as excinfo:
        storage.signed_url(f"gs://{BUCKET}/cat.jpg", expires_in=60)
    message = str(excinfo.value)
    assert f"gs://{BUCKET}/cat.jpg" in message
    assert "'google_cloud_default'" in message
    assert "AnonymousCredentials" in message
    assert "roles/iam.serviceAccountTokenCreator" in message
    assert "iam.serviceAccounts.signBlob" in message
    assert "X-Goog-Signature" not in message


# --------------------------------------------------------------------------------------------------
# Existence
# --------------------------------------------------------------------------------------------------


def test_check_exists(remote: Remote) -> None:
    remote.server.put_object(BUCKET, "photos/cat.jpg", JPEG)
    storage = ObjectStorage()
    storage.check_exists(remote.uri("photos/cat.jpg"))

    missing_key = remote.uri("photos/dog.jpg")
    with pytest.raises(ObjectNotFoundError) as excinfo:
        storage.check_exists(missing_key)
    assert str(excinfo.value) == f"{missing_key} does not exist"

    missing_bucket = remote.uri("photos/cat.jpg", bucket="no-such-bucket")
    with pytest.raises(ObjectNotFoundError) as excinfo:
        storage.check_exists(missing_bucket)
    assert str(excinfo.value) == f"bucket 'no-such-bucket' does not exist ({missing_bucket})"


def test_check_all_exist_lists_the_missing(remote: Remote, tmp_path: Path) -> None:
    present = [remote.uri(f"ok/{i:02}.jpg") for i in range(20)]
    for uri in present:
        remote.server.put_object(BUCKET, uri.split(f"{BUCKET}/", 1)[1], JPEG)
    missing = [remote.uri(f"gone/{i:02}.jpg") for i in range(12)]
    (tmp_path / "local.jpg").write_bytes(JPEG)
    local = [str(tmp_path / "local.jpg"), "https://example.com/x.jpg"]
    storage = ObjectStorage()

    storage.check_all_exist(present + local)
    with pytest.raises(ObjectNotFoundError) as excinfo:
        storage.check_all_exist(present + missing + local + missing[:1])
    message = str(excinfo.value)
    assert message.startswith(f"12 of {len(present) + len(missing) + len(local)} objects do not exist: ")
    assert ", ".join(missing[:10]) in message
    assert missing[10] not in message
    assert message.endswith(" and 2 more")
    assert not any(uri in message for uri in present)


def test_check_all_exist_names_a_missing_bucket(remote: Remote) -> None:
    uri = remote.uri("cat.jpg", bucket="no-such-bucket")
    with pytest.raises(ObjectNotFoundError, match=re.escape(f"1 of 1 objects do not exist: {uri}") + "$"):
        ObjectStorage().check_all_exist([uri])


def test_check_all_exist_rejects_bucket_uris(remote: Remote) -> None:
    with pytest.raises(ValueError, match="not an object"):
        ObjectStorage().check_all_exist([remote.uri("photos/")])


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------

LISTED_KEYS = [
    "photos/a.jpg",
    "photos/B.JPG",
    "photos/c.png",
    "photos/d.webp",
    "photos/e.jpeg",
    "photos/notes.txt",
    "photos/jpg",
    "photos/dir/",
    "photos/nested/deep/f.Jpg",
    "photos/nested/g.gif",
    "photos-old/h.jpg",
    "other/i.jpg",
]


def test_list_images(remote: Remote) -> None:
    for key in LISTED_KEYS:
        remote.server.put_object(BUCKET, key, b"" if key.endswith("/") else JPEG)
    storage = ObjectStorage()

    expected = sorted(
        remote.uri(f"photos/{name}")
        for name in ["a.jpg", "B.JPG", "c.png", "d.webp", "e.jpeg", "nested/deep/f.Jpg"]
    )
    assert storage.list_images(remote.uri("photos/")) == expected
    # A prefix is a key prefix, as in S3 and GCS.
    assert storage.list_images(remote.uri("photos")) == sorted([*expected, remote.uri("photos-old/h.jpg")])
    assert storage.list_images(remote.uri("photos/"), patterns=["*.TXT", "*.gif"]) == [
        remote.uri("photos/nested/g.gif"),
        remote.uri("photos/notes.txt"),
    ]
    assert len(storage.list_images(f"{remote.scheme}://{BUCKET}")) == len(expected) + 2
    assert storage.list_images(remote.uri("nothing/here/")) == []
    assert IMAGE_PATTERNS == ("*.jpg", "*.jpeg", "*.png", "*.webp")


def test_list_images_missing_bucket(remote: Remote) -> None:
    prefix = remote.uri("photos/", bucket="no-such-bucket")
    with pytest.raises(ObjectNotFoundError, match=r"bucket 'no-such-bucket' does not exist"):
        ObjectStorage().list_images(prefix)


# --------------------------------------------------------------------------------------------------
# Read, write, copy
# --------------------------------------------------------------------------------------------------


def test_write_then_read(remote: Remote) -> None:
    storage = ObjectStorage()
    uri = remote.uri("out/captions.json")
    storage.write_bytes(uri, b'{"caption": "a cat"}', content_type="application/json")
    assert storage.read_bytes(uri) == b'{"caption": "a cat"}'
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"


def test_read_and_write_errors(remote: Remote) -> None:
    storage = ObjectStorage()
    with pytest.raises(ObjectNotFoundError, match=f"^{re.escape(remote.uri('missing.jpg'))} does not exist$"):
        storage.read_bytes(remote.uri("missing.jpg"))
    uri = remote.uri("x.jpg", bucket="no-such-bucket")
    with pytest.raises(ObjectNotFoundError, match=r"^bucket 'no-such-bucket' does not exist"):
        storage.read_bytes(uri)
    with pytest.raises(ObjectNotFoundError, match=r"^bucket 'no-such-bucket' does not exist"):
        storage.write_bytes(uri, b"x")
    with pytest.raises(ValueError, match="not an object"):
        storage.read_bytes(remote.uri(""))


def test_copy_within_a_store(remote: Remote) -> None:
    remote.server.create_bucket("blip2-archive")
    remote.server.put_object(BUCKET, "in/cat.jpg", JPEG, "image/jpeg")
    storage = ObjectStorage()

    storage.copy(remote.uri("in/cat.jpg"), remote.uri("out/cat.jpg"))
    storage.copy(remote.uri("in/cat.jpg"), remote.uri("cat.jpg", bucket="blip2-archive"))
    assert storage.read_bytes(remote.uri("out/cat.jpg")) == JPEG
    assert storage.read_bytes(remote.uri("cat.jpg", bucket="blip2-archive")) == JPEG

    with pytest.raises(ObjectNotFoundError, match=f"^{re.escape(remote.uri('in/dog.jpg'))} does not exist$"):
        storage.copy(remote.uri("in/dog.jpg"), remote.uri("out/dog.jpg"))
    destination = remote.uri("cat.jpg", bucket="no-such-bucket")
    with pytest.raises(ObjectNotFoundError, match=r"^bucket 'no-such-bucket' does not exist \(") as excinfo:
        storage.copy(remote.uri("in/cat.jpg"), destination)
    assert destination in str(excinfo.value)
    with pytest.raises(ValueError, match="onto itself"):
        storage.copy(remote.uri("in/cat.jpg"), remote.uri("in/cat.jpg"))


def test_copy_across_stores(s3_connection: LocalS3, gcs_connection: LocalGcs, tmp_path: Path) -> None:
    s3_connection.create_bucket(BUCKET)
    gcs_connection.create_bucket(BUCKET)
    storage = ObjectStorage()
    source = tmp_path / "cat.jpg"
    source.write_bytes(JPEG)

    storage.copy(str(source), f"s3://{BUCKET}/cat.jpg")
    storage.copy(f"s3://{BUCKET}/cat.jpg", f"gs://{BUCKET}/from-s3/cat.jpg")
    storage.copy(f"gs://{BUCKET}/from-s3/cat.jpg", str(tmp_path / "back" / "cat.jpg"))
    assert (tmp_path / "back" / "cat.jpg").read_bytes() == JPEG
    url = storage.signed_url(f"gs://{BUCKET}/from-s3/cat.jpg", expires_in=60)
    response = requests.get(url, timeout=10)
    assert response.content == JPEG
    assert response.headers["Content-Type"] == "image/jpeg"


def test_clients_are_created_once(remote: Remote) -> None:
    storage = ObjectStorage()
    remote.server.put_object(BUCKET, "cat.jpg", JPEG)
    storage.check_exists(remote.uri("cat.jpg"))
    client = storage._client_for(remote.scheme)
    storage.read_bytes(remote.uri("cat.jpg"))
    assert storage._client_for(remote.scheme) is client
