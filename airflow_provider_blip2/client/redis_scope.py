"""
Where a shared budget lives: the Redis server it is counted in, and the name of its limits there.

:func:`redis_params` reads an Airflow ``redis`` connection's fields as the Redis provider's hook
does; :func:`account_scope_name` names an API key's limits without the key (a digest), so every
connection with the same key, in every process, counts against the same sorted sets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BudgetScope:
    """
    One set of limits counted in Redis.

    :param name: Key prefix of its sorted sets.
    :param requests_per_minute: Requests allowed in any window.
    :param max_concurrency: Predictions allowed in flight.
    """

    name: str
    requests_per_minute: int
    max_concurrency: int


@dataclass(frozen=True)
class RedisParams:
    """
    How to reach Redis: the keyword arguments of ``redis.Redis`` and ``redis.asyncio.Redis``.

    :param kwargs: ``host``, ``port``, ``db``, ``username``, ``password`` and the ``ssl*`` options.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """A hashable identity (the password only as a digest)."""
        items = {k: str(v) for k, v in self.kwargs.items() if k != "password"}
        items["password"] = hashlib.sha256(str(self.kwargs.get("password")).encode()).hexdigest()[:12]
        return tuple(sorted(items.items()))


def account_scope_name(base_url: str, api_key: str) -> str:
    """
    The Redis name of an API key's limits: every connection with the same key shares them.

    :param base_url: The API's base URL.
    :param api_key: The key (only a digest of it is used).
    """
    return hashlib.sha256(f"{base_url}\n{api_key}".encode()).hexdigest()[:16]


_SSL_OPTIONS = ("ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_keyfile", "ssl_certfile", "ssl_check_hostname")


def redis_params(
    host: str | None, port: int | None, login: str | None, password: str | None, extra: dict[str, Any]
) -> RedisParams:
    """
    How to reach Redis, from the fields of an Airflow ``redis`` connection (as its RedisHook reads them).

    :param host: Host name.
    :param port: Port (default 6379).
    :param login: User name, if any.
    :param password: Password, if any.
    :param extra: The connection's extra: ``db`` and the ``ssl*`` options.
    """
    kwargs: dict[str, Any] = {
        "host": host or "localhost",
        "port": int(port or 6379),
        "db": int(extra.get("db") or 0),
        "username": login or None,
        "password": None if str(password).lower() in ("none", "false", "") else password,
    }
    kwargs.update({name: value for name, value in extra.items() if name in _SSL_OPTIONS})
    return RedisParams(kwargs)
