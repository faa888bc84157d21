"""
What the hooks of one event loop share: connection lookups and the HTTP connections to the API.

A triggerer runs every deferred task's trigger in one event loop, each trigger with a hook of its
own. Without sharing, a thousand triggers make a thousand connection lookups as they start and keep
a thousand HTTP clients with their pools. Here the triggers of a loop share one lookup per
connection (refreshed after :data:`CONNECTION_TTL` seconds, so a changed connection is seen) and
at most :data:`MAX_CONNECTIONS` HTTP connections, kept for the life of the loop (:func:`arequest`).

Each of those connections is an ``httpx.AsyncClient`` of its own, limited to one connection and
lent to one request at a time, rather than one client with a pool of many: httpcore's pool rescans
all its connections (each with a system call) and all its waiting requests every time a request
starts or ends (encode/httpcore#1035), which with many connections and a thousand triggers costs
milliseconds of the loop per read. A request waits for a free client in a semaphore instead, in
order, and each pool holds one connection and never queues.

A request cut short (an error, or its trigger cancelled mid-read) retires its client rather than
lending it again: a cancellation that lands while httpcore hands the connection back leaves it
counted as busy for good (encode/httpcore#1093), and the next request on that client would wait
for it until its pool timeout, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.cookiejar
import ssl
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

if TYPE_CHECKING:
    import httpx

#: Seconds a connection looked up in an event loop is reused before it is looked up again.
CONNECTION_TTL = 30.0
#: Requests in flight at a time in one event loop, each on an HTTP connection of its own. Their
#: answers may all be handled in one pass of the loop, so this also bounds how long the loop can be
#: busy at once; at the API's limits (60 requests a minute per key) a few are plenty. The most
#: recently used connections are lent first, so a quiet loop keeps few of them open.
MAX_CONNECTIONS = 20


@dataclass
class _LoopShare:
    """The connection lookups and HTTP clients of one event loop."""

    connections: dict[str, tuple[float, Any, dict[str, Any]]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    #: Clients not lent to a request, by whether they speak https; the last returned on top.
    idle: dict[bool, list[httpx.AsyncClient]] = field(default_factory=lambda: {False: [], True: []})
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONNECTIONS))
    #: Retired clients still closing (kept here so that their tasks are not garbage collected).
    closing: set[asyncio.Future[None]] = field(default_factory=set)


_SHARES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopShare] = weakref.WeakKeyDictionary()


def _share() -> _LoopShare:
    loop = asyncio.get_running_loop()
    share = _SHARES.get(loop)
    if share is None:
        share = _SHARES[loop] = _LoopShare()
    return share


async def aconnection(conn_id: str, hook: Any = None) -> tuple[Any, dict[str, Any]]:
    """
    A connection and its extra, looked up once per event loop and :data:`CONNECTION_TTL`.

    :param conn_id: The connection id.
    :param hook: The hook asking (Airflow uses it to pick the connection's type).
    """
    share = _share()
    lock = share.locks.setdefault(conn_id, asyncio.Lock())
    async with lock:
        cached = share.connections.get(conn_id)
        if cached is None or time.monotonic() - cached[0] >= CONNECTION_TTL:
            conn = await get_async_connection(conn_id, hook=hook)
            cached = share.connections[conn_id] = (time.monotonic(), conn, await get_async_extra_dejson(conn))
    return cached[1], cached[2]


async def arequest(uses_tls: bool, arguments: dict[str, Any]) -> httpx.Response:
    """
    Send one request on one of the loop's connections and read its answer.

    At most :data:`MAX_CONNECTIONS` requests of the loop are in flight; the others wait their turn
    here, in order. Errors are httpx's, for the caller to map.

    :param uses_tls: Whether the API's base URL is https.
    :param arguments: ``method``, ``url`` and the other keyword arguments of ``request``.
    """
    import httpx

    share = _share()
    arguments = {**arguments, "url": _parsed_url(arguments["url"])}
    async with share.slots:
        idle = share.idle[uses_tls]
        client = idle.pop() if idle else await _new_client(uses_tls)
        try:
            response = await client.request(**arguments)
        except BaseException:
            _retire(share, client)
            raise
        idle.append(client)
    # The client binds the response's stream to the response (httpx keeps the two in a reference
    # cycle: encode/httpx#3733), so each answer would wait for the cyclic garbage collector, whose
    # full collections stall a loop of a thousand triggers. The body is read and the stream
    # closed: an empty stream in its place frees both at once.
    response.stream = httpx.ByteStream(b"")
    return response


@functools.lru_cache(maxsize=4096)
def _parsed_url(url: str) -> httpx.URL:
    """A request URL, parsed once: each trigger reads the same prediction's URL every poll."""
    import httpx

    return httpx.URL(url)


def _retire(share: _LoopShare, client: httpx.AsyncClient) -> None:
    """Close a client whose request was cut short, in a task of its own: it is never lent again."""
    closing = asyncio.ensure_future(_close_quietly(client))
    share.closing.add(closing)
    closing.add_done_callback(share.closing.discard)


async def _close_quietly(client: httpx.AsyncClient) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


async def _new_client(uses_tls: bool) -> httpx.AsyncClient:
    """
    An HTTP client of one connection, never queueing a request.

    Building a TLS context reads the CA bundle from disk: it is done once per process, off the loop.
    """
    import httpx

    tls: ssl.SSLContext | bool = await asyncio.to_thread(_shared_ssl_context) if uses_tls else False
    return httpx.AsyncClient(
        verify=tls,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        cookies=_NoCookies(),
    )


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: a client serves every connection (API key) of the loop."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        """Keep no cookie the server sets."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        """Keep no cookie."""


@functools.cache
def _shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
