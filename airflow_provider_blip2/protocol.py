"""
Earlier home of the API client, kept so that imports written against it keep working.

New code imports from :mod:`airflow_provider_blip2.client`.
"""

from __future__ import annotations

from airflow_provider_blip2.client import *  # noqa: F403
from airflow_provider_blip2.client import __all__ as __all__
