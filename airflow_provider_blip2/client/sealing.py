"""
Image URLs that may hold a secret, sealed for the trip from a worker to a trigger.

An http(s) URL with a query may be presigned: it must not reach trigger kwargs in the clear (they
are stored, and printed by ``BaseTrigger.__repr__``). A batch's synchronous runs happen in the
triggerer, which needs the URL: the worker seals it with a key derived from the connection's API
key (Fernet: AES-128-CBC and HMAC-SHA256, from ``cryptography``, which Airflow ships), and the
trigger, which resolves the same connection, unseals it just before the request. Whoever reads the
kwargs without the API key learns nothing of the URL; whoever has the API key needs no URL.
"""

from __future__ import annotations

import base64
import hashlib

from airflow_provider_blip2.client.errors import Blip2InputError

#: What starts a sealed URL in trigger kwargs.
SEALED_PREFIX = "sealed:"


def needs_sealing(uri: str) -> bool:
    """Whether a URI may hold a secret (an http(s) URL with a query). :param uri: the image URI."""
    return uri.startswith(("http://", "https://")) and "?" in uri


def _fernet(api_key: str) -> object:
    from cryptography.fernet import Fernet

    digest = hashlib.sha256(b"airflow-provider-blip2 sealed image URL\n" + api_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def seal(uri: str, api_key: str, *, always: bool = False) -> str:
    """
    The URI as a trigger may carry it: sealed when it may hold a secret, else as it is.

    :param uri: The image URI.
    :param api_key: The connection's API key.
    :param always: Seal it whatever it looks like (an uploaded copy's public URL, which anyone
        who has it may read while it is kept).
    """
    if not (always or needs_sealing(uri)):
        return uri
    token = _fernet(api_key).encrypt(uri.encode())  # type: ignore[attr-defined]
    return SEALED_PREFIX + token.decode()


def unseal(value: str, api_key: str) -> str:
    """
    Inverse of :func:`seal`.

    :param value: A URI or a sealed one.
    :param api_key: The connection's API key (the same as the sealing's).
    :raises Blip2InputError: when the seal was made with another key (the connection changed).
    """
    if not value.startswith(SEALED_PREFIX):
        return value
    from cryptography.fernet import InvalidToken

    try:
        return _fernet(api_key).decrypt(value[len(SEALED_PREFIX) :].encode()).decode()  # type: ignore[attr-defined]
    except InvalidToken:
        raise Blip2InputError(
            "image: a sealed image URL could not be opened with the connection's API key (the key "
            "changed since the batch handed it over); clear the task to start over"
        ) from None
