"""
Keep the triggerer's full garbage collections short: freeze the heap it had when BLIP-2 triggers began.

A triggerer's event loop runs every trigger of the process, and Python's cyclic collector stops it
while it runs. Its full passes walk every tracked object, most of them Airflow's own, imported once
and alive for good: with 1,000 triggers reading every 2 s, passes of about 0.15 s, several a
minute, each a loop stall. :func:`gc.freeze` moves the objects alive at that moment out of the
collector's reach (what Airflow's LocalExecutor and DAG processor do before they fork), so the
passes walk only what was allocated since.

The cost: an object frozen while already unreachable in a reference cycle is never freed. That is
at most one collection's worth of garbage, once per triggerer process. ``[blip2]
freeze_triggerer_heap = False`` in the Airflow configuration turns it off.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

#: The Airflow configuration section and option that turn the freeze off.
CONFIG_SECTION = "blip2"
CONFIG_OPTION = "freeze_triggerer_heap"

_frozen = False
_lock = threading.Lock()


def freeze_enabled() -> bool:
    """Whether the Airflow configuration lets the triggerer's heap be frozen (on by default)."""
    from airflow.providers.common.compat.sdk import conf

    return bool(conf.getboolean(CONFIG_SECTION, CONFIG_OPTION, fallback=True))


def freeze_heap_once(log: logging.Logger | Any) -> bool:
    """
    Freeze the process's heap the first time a BLIP-2 trigger runs in it; True if this call did.

    :param log: Where the freeze is reported, once.
    """
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
    if not freeze_enabled():
        return False
    gc.freeze()
    log.info(
        "Froze %d objects of this triggerer's heap out of the garbage collector's full passes, "
        "so they no longer stall its event loop ([%s] %s = False turns this off)",
        gc.get_freeze_count(),
        CONFIG_SECTION,
        CONFIG_OPTION,
    )
    return True
