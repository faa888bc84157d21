"""Debian's Chromium, headless, driven by Playwright, for the system tests of the connection form."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, ViewportSize, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# The network is closed: without the background-networking flags Chromium's own connections are
# refused and slow every page down.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
# Generous waits: on two busy cores an Airflow page can take many seconds to render.
TIMEOUT_MS = 60_000

requires_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/system_packages.sh installs it)"
)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """
    Chromium with a fresh profile, no browser download: Playwright runs ``/usr/bin/chromium``.

    :param profile: An empty directory for the user data.
    """
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT
        )
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()
