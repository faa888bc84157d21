"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_provider_blip2 import __version__

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["login", "schema", "port", "extra"],
    "relabeling": {"host": "API base URL", "password": "API Key"},
    "placeholders": {"host": "https://api.eachlabs.ai", "password": "Eachlabs API key"},
}

CONN_FIELDS: dict[str, Any] = {
    "model": {
        "label": "Model",
        "description": "Model slug on the Eachlabs API.",
        "schema": {"type": ["string", "null"], "default": "blip-2"},
    },
    "model_version": {
        "label": "Model version",
        "description": "Sent with every prediction; the API documents it as deprecated and ignores it.",
        "schema": {"type": ["string", "null"], "default": "0.0.1"},
    },
    "request_timeout": {
        "label": "Request timeout (seconds)",
        "description": "How long to wait for one HTTP answer.",
        "schema": {"type": ["integer", "null"], "default": 30, "minimum": 1},
    },
    "requests_per_minute": {
        "label": "Requests per minute",
        "description": "Client-side budget shared by every task and trigger of one process (API limit: 60).",
        "schema": {"type": ["integer", "null"], "default": 60, "minimum": 1},
    },
    "max_concurrency": {
        "label": "Max predictions in flight",
        "description": "Predictions one process keeps running at once (API limit: 10).",
        "schema": {"type": ["integer", "null"], "default": 10, "minimum": 1},
    },
}


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata: package, integration, modules and the ``blip2`` connection type."""
    return {
        "package-name": "airflow-provider-blip2",
        "name": "BLIP-2 (Eachlabs)",
        "description": "Image captioning and visual question answering with BLIP-2 on the Eachlabs API.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "BLIP-2 (Eachlabs)",
                "external-doc-url": "https://www.eachlabs.ai",
                "tags": ["ai"],
            }
        ],
        "operators": [
            {
                "integration-name": "BLIP-2 (Eachlabs)",
                "python-modules": ["airflow_provider_blip2.operators.blip2"],
            }
        ],
        "hooks": [
            {
                "integration-name": "BLIP-2 (Eachlabs)",
                "python-modules": ["airflow_provider_blip2.hooks.blip2"],
            }
        ],
        "triggers": [
            {
                "integration-name": "BLIP-2 (Eachlabs)",
                "python-modules": ["airflow_provider_blip2.triggers.blip2"],
            }
        ],
        "connection-types": [
            {
                "connection-type": "blip2",
                "hook-class-name": "airflow_provider_blip2.hooks.blip2.Blip2Hook",
                "hook-name": "BLIP-2 (Eachlabs)",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
    }
