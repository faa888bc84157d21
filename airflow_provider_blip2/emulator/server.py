"""Running the emulator in-process (a uvicorn server in a thread) and serving image files locally."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar

import uvicorn

from airflow_provider_blip2.emulator.app import EmulatorApp, create_app
from airflow_provider_blip2.emulator.config import EmulatorConfig

_T = TypeVar("_T")
_TICK_SECONDS = 0.1


class _WakeableServer(uvicorn.Server):
    """A uvicorn server whose idle loop can be woken up, so that stopping it takes no full tick."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wakeup: asyncio.Event | None = None

    async def main_loop(self) -> None:
        """Tick like uvicorn's loop, but return as soon as :meth:`wake` is called after ``should_exit``."""
        self._wakeup = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), _TICK_SECONDS)

    def wake(self) -> None:
        """Wake the idle loop up; call it on the server's event loop."""
        if self._wakeup is not None:
            self._wakeup.set()


class EmulatorServer:
    """The emulator served by uvicorn in a background thread of this process.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with EmulatorServer(EmulatorConfig(time_scale=0.1)) as server:
            requests.get(f"{server.url}/v1/model?slug=blip-2", headers={"X-API-Key": "emulator-key"})

    :param config: the settings; tests may change fault probabilities of a running server through
        :attr:`config`.
    :param host: the address to bind.
    :param port: the port to bind; 0 picks a free port.
    :param log_level: uvicorn's log level.
    :param startup_timeout: seconds :meth:`start` waits for the server to accept connections.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout: float = 10.0,
    ) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self.app: EmulatorApp = create_app(self.config)
        self._requested_port = port
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._socket: socket.socket | None = None
        self._server: _WakeableServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The bound port.

        :raises RuntimeError: when the server is not running.
        """
        if self._socket is None:
            raise RuntimeError("the emulator server is not running")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``http://127.0.0.1:8765`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EmulatorServer:
        """Start serving and wait until the server accepts connections.

        :raises RuntimeError: when already started, or when the server does not come up in time.
        """
        if self._thread is not None:
            raise RuntimeError("the emulator server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY needs the proto
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        uvicorn_config = uvicorn.Config(
            self.app,
            log_level=self._log_level,
            log_config=None,
            access_log=False,
            proxy_headers=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self._server = _WakeableServer(uvicorn_config)
        self._error = None
        self._thread = threading.Thread(target=self._serve, name="blip2-emulator", daemon=True)
        self._thread.start()
        self._wait_started()
        return self

    def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # SystemExit on a failed startup must not vanish silently
            self._error = exc
        finally:
            _close_loop(loop)

    def _wait_started(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                error = self._error
                self.stop()
                raise RuntimeError(f"the emulator server did not start: {error!r}")
            time.sleep(0.005)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, cancel running predictions and join the thread. Safe to call twice.

        :param timeout: seconds to wait for the thread.
        """
        if self._server is not None:
            self._server.should_exit = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._server.wake)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._server = None
        self._thread = None
        self._loop = None

    def __enter__(self) -> EmulatorServer:
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

    def _call_in_loop(self, function: Callable[[], _T]) -> _T:
        loop = self._loop
        if loop is None or not self.running:
            return function()

        async def call() -> _T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)

    def ledger(self) -> dict[str, Any]:
        """Return the ledger, the same JSON as ``GET /_emulator/ledger``."""
        return self._call_in_loop(self.app.emulator.snapshot)

    def reset(self) -> None:
        """Forget every prediction, ledger counter and rate window, and re-seed faults."""
        self._call_in_loop(self.app.emulator.reset)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


class _QuietFileHandler(SimpleHTTPRequestHandler):
    """Serves files without logging request lines (which could hold presigned query strings)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing.

        :param format: ignored.
        :param args: ignored.
        """


@contextlib.contextmanager
def serve_directory(
    directory: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve the files of a directory over HTTP in a background thread.

    Query strings are ignored, so presigned-looking URLs work too.

    :param directory: the directory to serve.
    :param host: the address to bind.
    :param port: the port to bind; 0 picks a free port.
    :return: a context manager yielding the base URL, e.g. ``http://127.0.0.1:PORT``.
    """
    handler = functools.partial(_QuietFileHandler, directory=os.fspath(directory))
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="blip2-files", daemon=True
    )
    thread.start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
