"""
The system tests' production-shaped deployment: one for every test that asks for it (the modules
``test_production_*.py``, one pytest-xdist worker's scope, ``tests/conftest.py``), stopped when
that worker leaves the system tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scripts.production import (
    ProductionStack,
    production_stack,
)
from tests.system.production import ALL_TRIGGERERS, flush_redis, require_system_packages


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    require_system_packages()
    with production_stack(tmp_path_factory.mktemp("production")) as running:
        yield running


@pytest.fixture
def fresh(stack: ProductionStack) -> ProductionStack:
    """
    The stack with the emulator's ledger cleared, at the real speed and limits (counted in a sliding
    window), both triggerers running.
    """
    stack.emulator.reset()
    stack.emulator.config.latency = 2.0
    stack.emulator.config.requests_per_minute = 60
    stack.emulator.config.rate_limit = "window"
    flush_redis(stack)
    for name in stack.deployment.triggerers:
        if not stack.deployment.running(name):
            stack.deployment.start(name)
    stack.deployment.wait_for(
        lambda: stack.deployment.alive_triggerers() >= ALL_TRIGGERERS, timeout=120, what="both triggerers"
    )
    return stack
