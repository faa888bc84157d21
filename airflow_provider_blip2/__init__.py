"""Apache Airflow provider for the BLIP-2 model served by the Eachlabs prediction API."""

from __future__ import annotations

__version__ = "0.1.0"
