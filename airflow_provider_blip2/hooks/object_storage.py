"""
The object storage's former import path, kept working: the names now live in
:mod:`airflow_provider_blip2.storage`, which this module re-exports (all of its ``__all__``).
"""

from __future__ import annotations

from airflow_provider_blip2.storage import *  # noqa: F403
from airflow_provider_blip2.storage import __all__ as __all__
