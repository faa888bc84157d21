"""What the tests read of an operator's OpenLineage facets: dataset names, namespaces and row counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

#: Whether the openlineage provider is installed (the Airflow 3.3 environment; not the 2.11 one).
OPENLINEAGE = importlib.util.find_spec("airflow.providers.openlineage") is not None


def lineage_names(lineage: Any) -> dict[str, list[tuple[Any, ...]]] | None:
    """
    ``{"inputs": [(namespace, name)], "outputs": [(namespace, name, rowCount)]}`` of an ``OperatorLineage``.

    :param lineage: What ``get_openlineage_facets_on_complete`` returned; ``None`` stays ``None``.
    """
    if lineage is None:
        return None
    outputs = []
    for dataset in lineage.outputs:
        statistics = (dataset.outputFacets or {}).get("outputStatistics")
        outputs.append((dataset.namespace, dataset.name, None if statistics is None else statistics.rowCount))
    return {"inputs": [(dataset.namespace, dataset.name) for dataset in lineage.inputs], "outputs": outputs}


def file_transport_env(path: Path) -> dict[str, str]:
    """
    The environment that makes the openlineage listener write every event to ``path``, one per line.

    The listener emits from a thread of the task's process, cheaper in tests than its default fork.
    Without the openlineage provider it is empty.

    :param path: The file; the events are appended.
    """
    if not OPENLINEAGE:
        return {}
    transport = {"type": "file", "log_file_path": str(path), "append": True}
    return {
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
        "AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": "True",
    }


def read_events(path: Path, job_name: str, event_type: str = "COMPLETE") -> list[dict[str, Any]]:
    """
    The events the listener wrote for one task (``dag_id.task_id``), ordered by map index.

    :param path: The file of :func:`file_transport_env`.
    :param job_name: ``dag_id.task_id``.
    :param event_type: ``START``, ``COMPLETE`` or ``FAIL``.
    """
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mine = [e for e in events if e["eventType"] == event_type and e["job"]["name"] == job_name]
    return sorted(mine, key=lambda e: e["run"]["facets"]["airflow"]["taskInstance"].get("map_index", -1))


def dataset_names(datasets: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(namespace, name)`` of the datasets of an event."""
    return [(dataset["namespace"], dataset["name"]) for dataset in datasets]
