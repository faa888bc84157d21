"""
The benchmarks' results as JSON files, which the documentation draws its plots from.

Every benchmark takes ``--json PATH`` and then writes, besides what it prints, one document::

    {"benchmark": "budget", "recorded_at": "...", "machine": {...}, "parameters": {...}, "results": ...}

``make bench`` writes them to ``benchmarks/results/``; ``scripts/benchmark_plots.py`` reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

#: Where ``make bench`` writes the results, and where the documentation reads them.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """
    Add the ``--json PATH`` option.

    :param parser: The benchmark's command line.
    """
    parser.add_argument(
        "--json", type=Path, metavar="PATH", default=None, help="also write the results as JSON to PATH"
    )


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        airflow = metadata.version("apache-airflow")
    except metadata.PackageNotFoundError:
        airflow = None
    return {
        "cpus": os.cpu_count(),
        # Other work on the machine skews every number: the 1, 5 and 15 minute load averages.
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "airflow": airflow,
    }


def write_results(path: Path | None, benchmark: str, parameters: dict[str, Any], results: Any) -> None:
    """
    Write one benchmark's results to ``path``; nothing when ``path`` is ``None``.

    :param path: The ``--json`` file, or ``None``.
    :param benchmark: The benchmark's module name, e.g. ``"budget"``.
    :param parameters: The run's command-line parameters.
    :param results: The numbers, JSON-serialisable.
    """
    if path is None:
        return
    document = {
        "benchmark": benchmark,
        "recorded_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine(),
        "parameters": parameters,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {path}", file=sys.stderr)
