"""
The provider's metrics, sent through Airflow's own metrics facility.

Whatever the deployment configured (``[metrics] statsd_on``, ``otel_on``, Datadog) receives them;
with metrics off, nothing is sent. Every metric is named ``blip2.…`` and tagged with ``dag_id``
and ``task_id`` (tags reach OpenTelemetry, Datadog and StatsD with InfluxDB tags); with
``[metrics] legacy_names_on`` (Airflow's default) each is also sent under
``blip2.….{dag_id}.{task_id}``, as Airflow names its own per-task metrics for plain StatsD.

=====================================  =======  ==========================================================
Name                                   Type     Meaning
=====================================  =======  ==========================================================
``blip2.predictions.created``          counter  predictions created (a create, or a synchronous run answered)
``blip2.predictions.succeeded``        counter  predictions that ended with an output
``blip2.predictions.failed``           counter  predictions that ended without one; tag ``reason``
                                                (``error``, ``timeout``, ``cancelled``, ``ambiguous``)
``blip2.predictions.cached``           counter  batch items answered from the result cache (no create)
``blip2.api.rate_limited``             counter  HTTP 429 answers of the API
``blip2.api.ambiguous_creates``        counter  creates sent without a confirmed answer (maybe paid)
``blip2.cost_micros``                  counter  the cost the API reported, in millionths of its unit
``blip2.cost_saved_micros``            counter  what cached results cost when they were predicted
``blip2.prediction.predict_time``      timer    the model's run time the API reported (ms)
=====================================  =======  ==========================================================
"""

from __future__ import annotations

import logging
from typing import Any

from airflow_provider_blip2.client.models import PredictionOutcome

log = logging.getLogger(__name__)

#: The prefix of every metric of the provider.
PREFIX = "blip2"
#: Millionths of the API's cost unit in one unit (counters count integers).
MICROS = 1_000_000

_stats_ready = False


def _stats() -> Any:
    """Airflow's ``Stats``, initialized in processes that have not done it (``airflow dags test``)."""
    global _stats_ready
    from airflow.providers.common.compat.sdk import Stats

    if not _stats_ready:
        _stats_ready = True
        try:
            _initialize_if_needed(Stats)
        except Exception as error:  # metrics must never fail a task
            log.debug("Could not initialize Airflow's metrics: %s", error)
    return Stats


def _initialize_if_needed(stats: Any) -> None:
    """Initialize Airflow 3.2+'s metrics backend from the configuration, if no process did."""
    try:
        from airflow.sdk._shared.observability.metrics import stats as stats_module
    except ImportError:  # Airflow 2: Stats configures itself
        return
    if getattr(stats_module, "_factory", None) is not None:
        return
    from airflow.observability.metrics import stats_utils
    from airflow.providers.common.compat.sdk import conf

    stats.initialize(
        factory=stats_utils.get_stats_factory(),
        export_legacy_names=conf.getboolean("metrics", "legacy_names_on", fallback=True),
    )


def _legacy_names_on() -> bool:
    from airflow.providers.common.compat.sdk import conf

    return conf.getboolean("metrics", "legacy_names_on", fallback=True)


class Blip2Metrics:
    """
    What one task (or its trigger) reports to Airflow's metrics.

    :param dag_id: The task's DAG, for the tags and per-task names; ``None`` outside a task.
    :param task_id: The task.
    """

    def __init__(self, dag_id: str | None = None, task_id: str | None = None) -> None:
        self.dag_id = dag_id
        self.task_id = task_id

    @classmethod
    def of(cls, task: Any) -> Blip2Metrics:
        """
        The metrics of a task, an operator or a task instance (whatever has ``dag_id`` and ``task_id``).

        :param task: The operator or task instance; ``None`` gives untagged metrics.
        """
        return cls(getattr(task, "dag_id", None), getattr(task, "task_id", None))

    @property
    def tags(self) -> dict[str, str]:
        """``dag_id`` and ``task_id``, where known."""
        tags = {"dag_id": self.dag_id, "task_id": self.task_id}
        return {name: str(value) for name, value in tags.items() if value}

    def _names(self, name: str) -> list[str]:
        full = f"{PREFIX}.{name}"
        if self.dag_id and self.task_id and _legacy_names_on():
            return [full, f"{full}.{self.dag_id}.{self.task_id}"]
        return [full]

    def incr(self, name: str, count: int = 1, **tags: str) -> None:
        """
        Count ``blip2.{name}``; never raises.

        :param name: The metric's name after ``blip2.``.
        :param count: How many.
        :param tags: Tags besides ``dag_id`` and ``task_id``.
        """
        if count <= 0:
            return
        try:
            stats = _stats()
            for full in self._names(name):
                stats.incr(full, count, tags={**self.tags, **tags})
        except Exception as error:
            log.debug("Could not send metric %s: %s", name, error)

    def timing(self, name: str, seconds: float) -> None:
        """
        Time ``blip2.{name}`` in milliseconds; never raises.

        :param name: The metric's name after ``blip2.``.
        :param seconds: The duration.
        """
        try:
            stats = _stats()
            for full in self._names(name):
                stats.timing(full, seconds * 1000.0, tags=self.tags)
        except Exception as error:
            log.debug("Could not send metric %s: %s", name, error)

    def created(self) -> None:
        """A prediction was created."""
        self.incr("predictions.created")

    def rate_limited(self) -> None:
        """The API answered 429."""
        self.incr("api.rate_limited")

    def ambiguous_create(self) -> None:
        """A create was sent but not confirmed."""
        self.incr("api.ambiguous_creates")

    def ended(self, outcome: PredictionOutcome) -> None:
        """
        A prediction ended: its status, cost and run time.

        :param outcome: How it ended.
        """
        if outcome.succeeded:
            self.incr("predictions.succeeded")
        else:
            self.incr("predictions.failed", reason=outcome.status)
        if outcome.cost:
            self.incr("cost_micros", round(outcome.cost * MICROS))
        if outcome.predict_time:
            self.timing("prediction.predict_time", outcome.predict_time)

    def cached(self, count: int, cost_saved: float) -> None:
        """
        Batch items were answered from the result cache.

        :param count: How many.
        :param cost_saved: What their results cost when they were predicted.
        """
        self.incr("predictions.cached", count)
        self.incr("cost_saved_micros", round(cost_saved * MICROS))
