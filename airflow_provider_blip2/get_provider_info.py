"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_provider_blip2 import __version__
from airflow_provider_blip2.client.settings import CONNECTION_FIELDS, UI_FIELD_BEHAVIOUR
from airflow_provider_blip2.triggers.heap import CONFIG_OPTION, CONFIG_SECTION

#: The extra fields of the connection form, from the one list the client reads its defaults from.
CONN_FIELDS: dict[str, Any] = {field.name: field.to_provider_info() for field in CONNECTION_FIELDS}


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
                "python-modules": [
                    "airflow_provider_blip2.operators.blip2",
                    "airflow_provider_blip2.operators.batch",
                ],
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
        "extra-links": ["airflow_provider_blip2.links.blip2.Blip2PredictionLink"],
        "config": {
            CONFIG_SECTION: {
                "description": "Settings of the BLIP-2 provider's processes.",
                "options": {
                    CONFIG_OPTION: {
                        "description": (
                            "Freeze the triggerer's heap (gc.freeze) when the first BLIP-2 trigger "
                            "runs in it, so the garbage collector's full passes walk only what was "
                            "allocated since and stall its event loop far less."
                        ),
                        "version_added": "0.2.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    }
                },
            }
        },
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
