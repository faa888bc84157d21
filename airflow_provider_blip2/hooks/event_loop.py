"""
What the hooks of one event loop share: connection lookups and one HTTP client per API.

A triggerer runs every deferred task's trigger in one event loop, each trigger with a hook of its
own. Without sharing, a thousand triggers make a thousand connection lookups as they start and keep
a thousand HTTP clients with their pools. Here the triggers of a loop share one lookup per
connection (refreshed after :data:`CONNECTION_TTL` seconds, so a changed connection is seen) and
one ``httpx.AsyncClient`` per base URL, kept for the life of the loop.
"""

from __future__ import annotations

import asyncio
import functools
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
#: Connections one shared HTTP client keeps open to the API at most.
MAX_CONNECTIONS = 100


@dataclass
class _LoopShare:
    """The connections and HTTP clients of one event loop."""

    connections: dict[str, tuple[float, Any, dict[str, Any]]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    clients: dict[bool, httpx.AsyncClient] = field(default_factory=dict)


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


async def ahttp_client(uses_tls: bool) -> httpx.AsyncClient:
    """
    The event loop's one HTTP client (one for https, one for plain http).

    Building a TLS context reads the CA bundle from disk: it is done once per process, off the loop.

    :param uses_tls: Whether the API's base URL is https.
    """
    import httpx

    share = _share()
    client = share.clients.get(uses_tls)
    if client is None:
        tls: ssl.SSLContext | bool = await asyncio.to_thread(_shared_ssl_context) if uses_tls else False
        # Another trigger may have made it while this one waited for the TLS context.
        client = share.clients.get(uses_tls) or httpx.AsyncClient(
            verify=tls,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        )
        share.clients[uses_tls] = client
    return client


@functools.cache
def _shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
