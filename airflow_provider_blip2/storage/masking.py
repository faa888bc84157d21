"""Registering signed URLs with Airflow's secret masker, a bounded number per process."""

from __future__ import annotations

import threading

#: Signed URLs one process registers with Airflow's secret masker. The masker recompiles one regular
#: expression of all its secrets for each new one (O(n²) for n URLs: about 30 s for 350 URLs), so a
#: large batch stops registering them; the provider never logs a signed URL (only file names), and
#: scrubs URLs out of the API's error messages.
MASKED_SIGNED_URLS_PER_PROCESS = 100

_masked_signed_urls = 0
_masked_signed_urls_lock = threading.Lock()


def mask_signed_url(url: str) -> None:
    """
    Register a signed URL with the secret masker, within :data:`MASKED_SIGNED_URLS_PER_PROCESS`.

    :param url: The signed URL; past the bound it is not registered.
    """
    global _masked_signed_urls
    with _masked_signed_urls_lock:
        _masked_signed_urls += 1
        count = _masked_signed_urls
    if count <= MASKED_SIGNED_URLS_PER_PROCESS:
        from airflow.providers.common.compat.sdk import mask_secret

        mask_secret(url)
