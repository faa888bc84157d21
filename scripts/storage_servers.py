"""
Local S3 and GCS servers on 127.0.0.1 for the tests and the demo: no account and no network.

* :func:`local_s3` runs moto's S3 in a thread of this process.
* :func:`local_gcs` runs ``gcp-storage-emulator`` as a subprocess, plus a tiny OAuth token endpoint.

Both listen on free ports and stop when the ``with`` block ends. They need the ``storage-servers``
dependency group of pyproject.toml (``moto[server]`` and ``gcp-storage-emulator``) and
``boto3``/``cryptography``; nothing here is imported by the provider itself.

Why a token endpoint: signing a GCS URL (V4) needs a private key, so the GCS connection holds a
throwaway service-account key generated at start-up. The Google client then fetches an OAuth token
from the key's ``token_uri`` before its first API call, and against an unreachable Google it retries
for about 95 s. The key's ``token_uri`` therefore points at a local endpoint that hands out a dummy
token; the emulator accepts any token. Everything else stays real: a real Airflow connection, the
google provider's own credential loading and real RSA signing by google-cloud-storage. Anonymous
credentials would avoid the token but cannot sign.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests

from scripts.processes import stop_process

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Credentials moto accepts; any value works.
S3_ACCESS_KEY = "testing"
S3_REGION = "us-east-1"
#: The project the GCS connection and the emulator's buckets belong to.
GCS_PROJECT = "test-project"
GCS_SIGNER_EMAIL = f"local-signer@{GCS_PROJECT}.iam.gserviceaccount.com"
#: The dummy OAuth token the local token endpoint hands out.
LOCAL_ACCESS_TOKEN = "local-token"
STARTUP_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------------
# S3 (moto)
# --------------------------------------------------------------------------------------------------


@dataclass
class LocalS3:
    """
    A running moto S3 server.

    :param endpoint_url: Base URL of the server, e.g. ``http://127.0.0.1:40123``.
    """

    endpoint_url: str
    _client: S3Client | None = field(default=None, init=False, repr=False)

    def connection(self) -> dict[str, Any]:
        """An Airflow ``aws`` connection to this server, as accepted by ``AIRFLOW_CONN_*`` (JSON)."""
        return {
            "conn_type": "aws",
            "login": S3_ACCESS_KEY,
            "password": S3_ACCESS_KEY,
            "extra": {"endpoint_url": self.endpoint_url, "region_name": S3_REGION},
        }

    def client(self) -> S3Client:
        """A boto3 S3 client for this server (created once)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=S3_ACCESS_KEY,
                aws_secret_access_key=S3_ACCESS_KEY,
                region_name=S3_REGION,
            )
        return self._client

    def reset(self) -> None:
        """Delete every bucket and object."""
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=10).raise_for_status()

    def create_bucket(self, name: str) -> None:
        """
        Create a bucket.

        :param name: The bucket name.
        """
        self.client().create_bucket(Bucket=name)

    def put_object(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """
        Store an object.

        :param bucket: An existing bucket.
        :param key: The object key.
        :param data: The object content.
        :param content_type: The object's ``Content-Type``.
        """
        self.client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


@contextlib.contextmanager
def local_s3() -> Iterator[LocalS3]:
    """Run moto's S3 server in a thread on a free port of 127.0.0.1 for the ``with`` block."""
    from moto.server import ThreadedMotoServer

    # The server's request log (werkzeug, one INFO line per request) would drown the demo's output.
    request_log = logging.getLogger("werkzeug")
    level = request_log.level
    request_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield LocalS3(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()
        request_log.setLevel(level)


# --------------------------------------------------------------------------------------------------
# GCS (gcp-storage-emulator)
# --------------------------------------------------------------------------------------------------


class _TokenHandler(BaseHTTPRequestHandler):
    """Answers every request with a dummy OAuth access token."""

    def _send_token(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {"access_token": LOCAL_ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 3600}
        ).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = _send_token
    do_GET = _send_token

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""


@contextlib.contextmanager
def local_token_endpoint() -> Iterator[str]:
    """Serve a dummy OAuth token endpoint on 127.0.0.1; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="local-oauth-token", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def throwaway_service_account_key(token_uri: str) -> dict[str, str]:
    """
    A service-account key file (as a dict) with a freshly generated RSA key.

    :param token_uri: Where Google's auth library fetches OAuth tokens for this key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": GCS_PROJECT,
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": GCS_SIGNER_EMAIL,
        "client_id": "100000000000000000000",
        "token_uri": token_uri,
    }


@dataclass
class LocalGcs:
    """
    A running ``gcp-storage-emulator`` and the token endpoint its connection's key uses.

    :param endpoint: Base URL of the emulator, e.g. ``http://127.0.0.1:40124``; clients find it
        through ``STORAGE_EMULATOR_HOST`` (see :meth:`env`).
    :param service_account_key: The throwaway key of :meth:`connection`.
    """

    endpoint: str
    service_account_key: dict[str, str] = field(repr=False)

    def env(self) -> dict[str, str]:
        """The environment variables that point google-cloud-storage at the emulator."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def connection(self) -> dict[str, Any]:
        """
        An Airflow ``google_cloud_platform`` connection for the emulator (JSON for ``AIRFLOW_CONN_*``).

        It holds the throwaway service-account key, so it can sign URLs.
        """
        return {
            "conn_type": "google_cloud_platform",
            "extra": {"keyfile_dict": self.service_account_key, "project": GCS_PROJECT},
        }

    def anonymous_connection(self) -> dict[str, Any]:
        """A ``google_cloud_platform`` connection with anonymous credentials: reads, but cannot sign."""
        return {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": GCS_PROJECT}}

    def reset(self) -> None:
        """Delete every bucket and object."""
        requests.get(f"{self.endpoint}/wipe", timeout=10).raise_for_status()

    def create_bucket(self, name: str) -> None:
        """
        Create a bucket.

        :param name: The bucket name.
        """
        response = requests.post(
            f"{self.endpoint}/storage/v1/b",
            params={"project": GCS_PROJECT},
            json={"name": name},
            timeout=10,
        )
        response.raise_for_status()

    def put_object(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """
        Store an object.

        :param bucket: An existing bucket.
        :param key: The object name.
        :param data: The object content.
        :param content_type: The object's ``Content-Type``.
        """
        # A multipart upload, as google-cloud-storage sends: the emulator's "media" upload fails on an
        # empty body, which folder placeholders ("photos/") have.
        boundary = uuid.uuid4().hex
        metadata = json.dumps({"name": key, "contentType": content_type})
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{metadata}\r\n".encode(),
                f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        response = requests.post(
            f"{self.endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            params={"uploadType": "multipart"},
            data=body,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
            timeout=10,
        )
        response.raise_for_status()


# The emulator's own command line (what the ``gcp-storage-emulator`` script runs), with one change: a
# listen backlog of 128 instead of http.server's 5. The emulator answers one request at a time and
# closes every connection (HTTP/1.0), so 8 threads checking objects at once overflow a backlog of 5,
# and each dropped connection costs a 1 s SYN retransmission.
_EMULATOR_MAIN = (
    "import sys, http.server; http.server.HTTPServer.request_queue_size = 128; "
    "from gcp_storage_emulator.__main__ import main; sys.exit(main())"
)


def _emulator_command(port: int) -> list[str]:
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        raise FileNotFoundError(
            "gcp-storage-emulator is not installed: pip install --group storage-servers (from the checkout)"
        )
    args = ["start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"]
    return [sys.executable, "-c", _EMULATOR_MAIN, *args]


def _wait_until_up(process: subprocess.Popen[bytes], endpoint: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"gcp-storage-emulator exited with code {process.returncode}:\n{log.read_text()[-2000:]}"
            )
        try:
            if requests.get(f"{endpoint}/", timeout=1).status_code == HTTPStatus.OK:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"gcp-storage-emulator did not answer on {endpoint} within {STARTUP_TIMEOUT:.0f} s")


@contextlib.contextmanager
def local_gcs() -> Iterator[LocalGcs]:
    """Run ``gcp-storage-emulator`` (in memory) on a free port of 127.0.0.1 for the ``with`` block."""
    with local_token_endpoint() as token_uri, tempfile.TemporaryDirectory(prefix="gcs-emulator-") as tmp:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "emulator.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                _emulator_command(port),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_until_up(process, endpoint, log)
            yield LocalGcs(endpoint=endpoint, service_account_key=throwaway_service_account_key(token_uri))
        finally:
            stop_process(process)


def main() -> None:
    """Run both servers until interrupted and print how to reach them."""
    with local_s3() as s3, local_gcs() as gcs:
        print(f"S3 (moto):                 {s3.endpoint_url}")
        print(f"GCS (gcp-storage-emulator): {gcs.endpoint}  (export STORAGE_EMULATOR_HOST={gcs.endpoint})")
        print("Press Ctrl+C to stop.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)


if __name__ == "__main__":
    main()
