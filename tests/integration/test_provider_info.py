"""
Provider registration: the metadata is valid for Airflow and the connection form is declared.

Starts: Airflow's providers manager in a Python process of its own; no server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import airflow
import jsonschema
import pytest

from airflow_provider_blip2.get_provider_info import get_provider_info
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from tests.conftest import requires_airflow_3


def core_schema(name: str) -> dict:
    return json.loads((Path(airflow.__file__).parent / name).read_text())


def test_provider_info_is_valid_against_core_schema() -> None:
    jsonschema.validate(get_provider_info(), core_schema("provider_info.schema.json"))


def test_provider_info_matches_the_hook() -> None:
    (conn_type,) = get_provider_info()["connection-types"]
    assert conn_type["connection-type"] == Blip2Hook.conn_type == "blip2"
    assert conn_type["hook-class-name"] == f"{Blip2Hook.__module__}.{Blip2Hook.__qualname__}"
    assert conn_type["hook-name"] == Blip2Hook.hook_name
    assert Blip2Hook.default_conn_name == "blip2_default"


def test_every_listed_module_imports() -> None:
    import importlib

    info = get_provider_info()
    for section in ("operators", "hooks", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)


@requires_airflow_3
def test_providers_manager_discovers_the_connection_form() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-blip2" in manager.providers
    widgets = manager.connection_form_widgets
    for field in ("model", "model_version", "request_timeout", "requests_per_minute", "max_concurrency"):
        assert f"extra__blip2__{field}" in widgets, field
    assert widgets["extra__blip2__requests_per_minute"].field["value"] == 60
    assert widgets["extra__blip2__max_concurrency"].field["schema"]["title"] == "Max predictions in flight"
    behaviour = manager.field_behaviours["blip2"]
    assert set(behaviour["hidden_fields"]) >= {"login", "schema", "port"}
    assert behaviour["relabeling"]["password"] == "API Key"
    assert "api.eachlabs.ai" in json.dumps(behaviour["placeholders"])


def test_conn_fields_are_valid_for_the_customized_form_schema() -> None:
    (conn_type,) = get_provider_info()["connection-types"]
    behaviour = conn_type["ui-field-behaviour"]
    schema = core_schema("customized_form_field_behaviours.schema.json")
    jsonschema.validate(
        {
            "hidden_fields": behaviour["hidden-fields"],
            "relabeling": behaviour["relabeling"],
            "placeholders": behaviour["placeholders"],
        },
        schema,
    )


def test_airflow_2_form_methods_agree_with_the_declarative_metadata() -> None:
    pytest.importorskip("wtforms")
    pytest.importorskip("flask_appbuilder")
    widgets = Blip2Hook.get_connection_form_widgets()
    (conn_type,) = get_provider_info()["connection-types"]
    assert set(widgets) == set(conn_type["conn-fields"])
    behaviour = Blip2Hook.get_ui_field_behaviour()
    assert behaviour["relabeling"] == conn_type["ui-field-behaviour"]["relabeling"]


def test_airflow_cli_lists_the_provider(tmp_path: Path) -> None:
    env = {"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "providers", "get", "airflow-provider-blip2", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "airflow-provider-blip2" in result.stdout


def test_the_prediction_link_is_registered_for_the_ui() -> None:
    """Airflow 2's webserver rebuilds the link of a serialized DAG only from a registered class."""
    from airflow.providers_manager import ProvidersManager

    from airflow_provider_blip2.links.blip2 import Blip2PredictionLink
    from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator

    path = f"{Blip2PredictionLink.__module__}.{Blip2PredictionLink.__qualname__}"
    assert get_provider_info()["extra-links"] == [path]
    assert path in ProvidersManager().extra_links_class_names
    assert [type(link) for link in Blip2PredictionOperator.operator_extra_links] == [Blip2PredictionLink]
