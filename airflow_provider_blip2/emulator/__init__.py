"""A local emulator of the Eachlabs prediction API serving the ``blip-2`` model.

It is an independent implementation (it imports nothing from Airflow or from the rest of this package),
built on FastAPI and uvicorn, for tests, benchmarks, demos and offline development::

    from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory

    with serve_directory("images/") as images, EmulatorServer(EmulatorConfig(time_scale=0.1)) as server:
        ...  # point a client at server.url with API key "emulator-key" and image URLs under images

Outputs are deterministic and start with ``[emulated]``; no model runs.
"""

from airflow_provider_blip2.emulator.app import create_app
from airflow_provider_blip2.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from airflow_provider_blip2.emulator.server import EmulatorServer, serve_directory

__all__ = ["DEFAULT_API_KEY", "EmulatorConfig", "EmulatorServer", "create_app", "serve_directory"]
