"""
System test: the ``blip2`` connection form of Airflow 2.11's webserver in a real browser.

``airflow webserver`` (Flask-AppBuilder, one admin user) and headless Chromium: log in, add a BLIP-2
connection, check the form that ``Blip2Hook.get_ui_field_behaviour`` and
``get_connection_form_widgets`` build, press Test (``Blip2Hook.test_connection`` in the webserver,
against the emulator), save, and read the connection back through the REST API.

Starts: an Airflow 2.11 webserver (SQLite, its own virtualenv) and Chromium, headless.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from packaging.version import Version
from playwright.sync_api import BrowserContext, Page, expect

from airflow_provider_blip2.client.settings import CONNECTION_FIELDS, UI_FIELD_BEHAVIOUR
from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer
from scripts.ports import free_port
from scripts.sandbox import AirflowSandbox
from tests.conftest import AIRFLOW_VERSION, API_KEY
from tests.system.browser import chromium, requires_chromium

USER, PASSWORD = "admin", "form-test-password"
CONN_ID = "blip2_ui"

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(Version("3.0") <= AIRFLOW_VERSION, reason="the Airflow 2 webserver's form"),
    requires_chromium,
]


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(api_keys=(API_KEY,))) as server:
        yield server


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The webserver's base URL; one gunicorn worker, the admin ``USER``."""
    home = tmp_path_factory.mktemp("form-home-airflow2")
    sandbox = AirflowSandbox(
        home,
        extra_env={
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__CORE__EXECUTOR": "SequentialExecutor",
            "AIRFLOW__WEBSERVER__WORKERS": "1",
            "AIRFLOW__WEBSERVER__SECRET_KEY": os.urandom(16).hex(),
            "HOME": str(home),  # gunicorn keeps its control socket under ~/.gunicorn
        },
    )
    sandbox.migrate()
    sandbox.airflow(
        *("users", "create", "--role", "Admin", "--username", USER, "--password", PASSWORD),
        *("--email", "admin@example.com", "--firstname", "Form", "--lastname", "Test"),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (home / "webserver.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "airflow", "webserver", "--port", str(port), "--hostname", "127.0.0.1"],
            env=sandbox.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the webserver did not start:\n{(home / 'webserver.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the webserver's process group (gunicorn and its worker); SIGKILL it after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser: BrowserContext, webserver: str) -> Iterator[Page]:
    """The add-connection page, after logging in on the login page it redirects to."""
    page = browser.new_page()
    page.goto(f"{webserver}/connection/add")
    page.wait_for_url("**/login/**")
    page.get_by_label("Username").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url("**/connection/add")
    try:
        yield page
    finally:
        page.close()


def test_add_a_blip2_connection_test_it_and_save_it(
    page: Page, webserver: str, emulator: EmulatorServer
) -> None:
    page.select_option("#conn_type", "blip2")

    relabel, placeholders = UI_FIELD_BEHAVIOUR["relabeling"], UI_FIELD_BEHAVIOUR["placeholders"]
    for name in ("host", "password"):
        expect(page.locator(f"label[for={name}]")).to_have_text(relabel[name])
        expect(page.locator(f"#{name}")).to_have_attribute("placeholder", placeholders[name])
    expect(page.locator("#password")).to_have_attribute("type", "password")
    for hidden in UI_FIELD_BEHAVIOUR["hidden-fields"]:
        expect(page.locator(f"#{hidden}")).to_be_hidden()
    for field in CONNECTION_FIELDS:
        widget_id = f"extra__blip2__{field.name}"
        expect(page.locator(f"label[for={widget_id}]")).to_have_text(field.label)
        default = "" if field.default is None else str(field.default)
        expect(page.locator(f"#{widget_id}")).to_have_value(default)
        expect(page.get_by_text(field.description, exact=True)).to_be_visible()

    page.fill("#conn_id", CONN_ID)
    page.fill("#host", emulator.url)
    page.fill("#password", API_KEY)
    page.fill("#extra__blip2__requests_per_minute", "30")
    expect(page.locator("#password")).to_have_attribute("type", "password")

    # Test runs Blip2Hook.test_connection in the webserver with the form's values.
    with page.expect_response("**/api/v1/connections/test") as info:
        page.get_by_role("button", name="Test").click()
    answer: dict[str, Any] = info.value.json()
    message = f"Connected to {emulator.url}: the API key is valid, model 'blip-2' exists"
    assert answer == {"status": True, "message": message}
    expect(page.locator(".alert-success")).to_have_text(message)

    page.get_by_role("button", name="Save").click()
    page.wait_for_url(lambda url: "/connection/add" not in url)

    # The REST API (with the browser's session) has it, without the key.
    response = page.request.get(f"{webserver}/api/v1/connections/{CONN_ID}")
    assert response.ok, response.text()
    stored = response.json()
    assert API_KEY not in response.text()
    assert (stored["conn_type"], stored["host"], stored["port"]) == ("blip2", emulator.url, None)
    defaults = {field.name: field.default for field in CONNECTION_FIELDS if field.default is not None}
    assert json.loads(stored["extra"]) == {**defaults, "requests_per_minute": 30}
