"""
A batch's result cache: the successes of earlier runs, kept for images and inputs that did not change.

The cache is one JSON-lines file: a header line ``{"format": "blip2-result-cache", "version": 1}``,
then one line per result, ``{"key", "fingerprint", "at", "result"}``. ``key`` names an image and
what was asked of it (:func:`cache_key`: the image, every input as it is sent, the model and its
version); ``fingerprint`` is the image's version when it was predicted
(:mod:`~airflow_provider_blip2.storage.fingerprints`); ``result`` is its output line. A later
line of the same key replaces an earlier one. Each run rewrites the file whole (atomically: a crash
leaves the old file or the new one), one line per key: it grows by what the run adds, and a
changed image replaces its line. A compaction (``cache_compact``) keeps only the keys of one run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_blip2.client.errors import Blip2InputError

#: The header's ``format``: what tells a result cache from any other file.
CACHE_FORMAT = "blip2-result-cache"
#: The version of the layout this module reads and writes.
CACHE_VERSION = 1


class ResultCacheError(Blip2InputError):
    """A file at ``cache_uri`` is not a result cache this version can read (corrupt or foreign)."""


def cache_key(image: str, inputs: Mapping[str, Any], *, model: str, model_version: str) -> str:
    """
    What names an image and what was asked of it: a SHA-256 of the image and the inputs as sent.

    :param image: The image's key in the batch (its URI; a URL's query redacted).
    :param inputs: The prediction's inputs as sent, without the image (question or caption,
        context, temperature, sampling).
    :param model: The model slug.
    :param model_version: The model version.
    """
    identity = {"image": image, "inputs": dict(inputs), "model": model, "version": model_version}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """
    One success of an earlier run.

    :param key: :func:`cache_key` of the image and inputs.
    :param fingerprint: The image's fingerprint when it was predicted.
    :param result: Its output line (``output``, ``prediction_id``, ``predict_time``, ``cost``...).
    :param at: Unix time it was added to the cache.
    """

    key: str
    fingerprint: str
    result: dict[str, Any]
    at: float

    @property
    def cost(self) -> float | None:
        """The cost recorded for it, when the API reported one."""
        cost = self.result.get("cost")
        return float(cost) if isinstance(cost, (int, float)) else None

    def to_json(self) -> dict[str, Any]:
        """The cache file's line."""
        return {"key": self.key, "fingerprint": self.fingerprint, "at": self.at, "result": self.result}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> CachedResult:
        """
        Inverse of :meth:`to_json`.

        :param value: A cache file's line, decoded.
        :raises ValueError: When it is not one (also KeyError or TypeError).
        """
        result = value["result"]
        if not isinstance(result, dict):
            raise TypeError("result is not an object")
        return cls(str(value["key"]), str(value["fingerprint"]), result, float(value["at"]))


class ResultCache:
    """
    The results of a cache file, by key (the last line of a key wins).

    :param entries: Key -> result.
    """

    def __init__(self, entries: dict[str, CachedResult] | None = None) -> None:
        self.entries = dict(entries or {})
        self._added: dict[str, CachedResult] = {}

    @classmethod
    def parse(cls, data: bytes, *, uri: str) -> ResultCache:
        """
        Read a cache file; an empty file is an empty cache.

        :param data: The file's content.
        :param uri: Where it was read, for the error.
        :raises ResultCacheError: When it is not a result cache (naming ``cache_uri`` and the fix).
        """
        if not data.strip():
            return cls()
        rows = data.decode("utf-8", errors="replace").splitlines()
        header = _decode(rows[0], uri, 1)
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
            raise ResultCacheError(
                f"cache_uri {uri} is not a BLIP-2 result cache (its first line is no "
                f'{{"format": "{CACHE_FORMAT}"}} header): point cache_uri at a new path, or remove the file'
            )
        if header.get("version") != CACHE_VERSION:
            raise ResultCacheError(
                f"cache_uri {uri} is a result cache of version {header.get('version')!r}, which this "
                f"provider (version {CACHE_VERSION}) cannot read: upgrade the provider, "
                "or use a new cache_uri"
            )
        entries: dict[str, CachedResult] = {}
        for number, row in enumerate(rows[1:], start=2):
            if not row.strip():
                continue
            value = _decode(row, uri, number)
            try:
                entry = CachedResult.from_json(value)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ResultCacheError(
                    f"cache_uri {uri} is corrupt: line {number} is not a cached result; "
                    "remove the file (its results are predicted again) or restore it"
                ) from None
            entries[entry.key] = entry
        return cls(entries)

    def lookup(self, key: str, fingerprint: str | None) -> CachedResult | None:
        """
        The cached success of an image and inputs, if the image's fingerprint is unchanged.

        :param key: :func:`cache_key`.
        :param fingerprint: The image's fingerprint now; ``None`` (unknown) never matches.
        """
        entry = self.entries.get(key)
        if entry is None or fingerprint is None or entry.fingerprint != fingerprint:
            return None
        return entry

    def cost_estimate(self) -> float | None:
        """The mean recorded cost of a prediction in the cache, or ``None`` when none recorded one."""
        costs = [cost for entry in self.entries.values() if (cost := entry.cost) is not None]
        return sum(costs) / len(costs) if costs else None

    def add(self, entries: Iterable[CachedResult]) -> None:
        """
        Add results (replacing those of the same keys).

        :param entries: New successes.
        """
        for entry in entries:
            self.entries[entry.key] = entry
            self._added[entry.key] = entry

    def merged_into(self, current: ResultCache) -> ResultCache:
        """
        What was added here, on top of ``current`` (the file as it is now: another run may have written it).

        :param current: The cache read again just before writing.
        """
        merged = ResultCache(current.entries)
        merged.add(self._added.values())
        return merged

    @property
    def added(self) -> int:
        """Results added since the file was read."""
        return len(self._added)

    def to_bytes(self, *, keep: set[str] | None = None) -> bytes:
        """
        The file's new content: the header, then one line per key.

        :param keep: Keys to keep, dropping every other (a compaction to one run's items).
        """
        header = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION})
        entries = [e for e in self.entries.values() if keep is None or e.key in keep]
        rows = [header] + [json.dumps(entry.to_json(), ensure_ascii=False) for entry in entries]
        return "".join(row + "\n" for row in rows).encode()


def new_entry(
    key: str, fingerprint: str, result: Mapping[str, Any], *, now: float | None = None
) -> CachedResult:
    """
    A success to add to the cache.

    :param key: :func:`cache_key`.
    :param fingerprint: The image's fingerprint before it was predicted.
    :param result: Its output line.
    :param now: Unix time.
    """
    kept = {name: value for name, value in result.items() if name not in ("cached", "attempts")}
    return CachedResult(key, fingerprint, kept, round(now or time.time(), 3))


def _decode(row: str, uri: str, number: int) -> Any:
    try:
        return json.loads(row)
    except json.JSONDecodeError:
        raise ResultCacheError(
            f"cache_uri {uri} is corrupt or not a result cache: line {number} is not JSON; "
            "point cache_uri at a new path, or remove the file (its results are predicted again)"
        ) from None
