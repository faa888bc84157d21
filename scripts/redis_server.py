"""A throwaway Redis server on 127.0.0.1, without persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from scripts.ports import free_port
from scripts.processes import stop_process


def redis_missing_reason() -> str | None:
    """Why a Redis server cannot be started here, or None when it can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make system-packages installs it as root)"
    return None


def ping(port: int, timeout: float = 1.0) -> bool:
    """
    Whether a Redis server on 127.0.0.1 answers ``PING`` with ``PONG``.

    :param port: Its port.
    :param timeout: Seconds for the connection and the answer.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """
    ``redis-server`` on a free loopback port, saving nothing, stopped on exit::

        with RedisServer() as redis:
            redis.url  # redis://127.0.0.1:PORT/0

    :param start_timeout: Seconds to wait for the server to answer ``PING``.
    """

    def __init__(self, *, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.folder: Path | None = None

    @property
    def url(self) -> str:
        """The server's URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        """The server's log file."""
        if self.folder is None:
            raise RuntimeError("the Redis server is not started")
        return self.folder / "redis.log"

    def start(self) -> RedisServer:
        """
        Start the server and wait until it answers ``PING``.

        :raises RuntimeError: when redis-server is missing, exits or does not answer in time.
        """
        reason = redis_missing_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.folder = Path(tempfile.mkdtemp(prefix="blip2-redis-"))
        self.port = free_port()
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--logfile",
            str(self.log_file),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while not ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-4000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL), wait for it and delete its folder. Safe to call twice."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def log(self) -> str:
        """The server's log so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    def __enter__(self) -> RedisServer:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()
