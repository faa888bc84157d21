"""
Signed URLs are registered with the secret masker up to a bound per process.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import pytest

from airflow_provider_blip2.storage import masking


def test_signed_urls_past_the_bound_are_not_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.providers.common.compat.sdk as sdk

    registered: list[str] = []
    monkeypatch.setattr(sdk, "mask_secret", registered.append, raising=False)
    monkeypatch.setattr(masking, "_masked_signed_urls", masking.MASKED_SIGNED_URLS_PER_PROCESS - 1)

    for url in ("https://signed/last", "https://signed/past", "https://signed/further"):
        masking.mask_signed_url(url)

    assert registered == ["https://signed/last"]
    assert masking._masked_signed_urls == masking.MASKED_SIGNED_URLS_PER_PROCESS + 2
