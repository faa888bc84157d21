"""
A production-shaped Airflow deployment on loopback, against the API emulator at the API's real limits.

PostgreSQL as the metadata database, a Redis server, LocalExecutor with several slots (or Celery
workers whose broker is that Redis), two triggerers, and the emulator as the real API behaves: 60
requests a minute and 10 predictions in flight per key, 2 s per prediction, no time scaling, 429
answers that carry ``retry_after`` in the body only, and a share of the reads answered 5xx. Images
are served from a local file server under distinct names, so the emulator's ledger counts the
creates of each image.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from scripts.deployment import AirflowDeployment, CeleryWorkers
from scripts.postgres import PostgresCluster, postgres_missing_reason
from scripts.redis_server import RedisServer, redis_missing_reason
from scripts.sandbox import REPO_ROOT, AirflowSandbox

SAMPLE_IMAGES = REPO_ROOT / "example_dags" / "data"
SYSTEM_DAGS = REPO_ROOT / "tests" / "system" / "dags"
API_KEY = "production-shaped-key-7c1e"
DAG_ID = "system_blip2_production"
SCALE_DAG_ID = "system_blip2_production_scale"
#: The scale DAG with the ``blip2_shared`` connection (the budget in Redis).
SHARED_SCALE_DAG_ID = "system_blip2_production_scale_shared"
#: The mapped DAG whose tasks run in the pool :data:`POOL`.
POOL_DAG_ID = "system_blip2_production_pool"
POOL = "blip2_predictions"
#: Requests per minute of the ``blip2_shared`` connection (tests lower the emulator's limit to it).
SHARED_REQUESTS_PER_MINUTE = 30


def missing_reason() -> str | None:
    """Why the production-shaped stack cannot run here (PostgreSQL or Redis missing), or None."""
    return postgres_missing_reason() or redis_missing_reason()


@dataclass
class ProductionSettings:
    """
    How the production-shaped stack is shaped.

    :param parallelism: Task instances running at once: LocalExecutor's slots, or with
        ``celery_workers`` the worker processes of all the Celery workers together.
    :param triggerers: Triggerers, each its own process.
    :param latency: Seconds per prediction in the emulator.
    :param latency_spread: How much each prediction's latency varies (``EmulatorConfig.latency_spread``).
    :param read_fault_rate: Share of prediction reads (``GET``) the emulator answers 500, 502 or 503.
    :param requests_per_minute: The emulator's rate limit per key.
    :param rate_limit: How the emulator counts it: ``window`` (sliding), ``bucket`` (token bucket) or
        ``fixed`` (a fixed window).
    :param max_in_flight: The emulator's limit of predictions in flight per key.
    :param redis_in_connection: Put ``"redis_conn_id": "redis_default"`` in the blip2 connection's
        extra, next to a ``redis_default`` connection to the local Redis.
    :param seed: The emulator's fault seed.
    :param extra_env: More Airflow environment variables.
    :param celery_workers: Run the tasks on this many Celery workers, their broker the Redis server's
        database 1 (the budget keeps database 0); 0: LocalExecutor.
    """

    parallelism: int = 8
    triggerers: int = 2
    latency: float = 2.0
    latency_spread: float = 0.0
    read_fault_rate: float = 0.02
    requests_per_minute: int = 60
    rate_limit: str = "window"
    max_in_flight: int = 10
    redis_in_connection: bool = False
    seed: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    celery_workers: int = 0

    def celery(self, redis: RedisServer) -> CeleryWorkers | None:
        """The Celery workers to run, or None for LocalExecutor."""
        if not self.celery_workers:
            return None
        return CeleryWorkers(
            f"redis://127.0.0.1:{redis.port}/1",
            workers=self.celery_workers,
            concurrency=max(1, self.parallelism // self.celery_workers),
        )

    def emulator_config(self) -> EmulatorConfig:
        """The emulator's settings: real limits and speed, body-only ``retry_after``, faulty reads."""
        return EmulatorConfig(
            api_keys=(API_KEY,),
            latency=self.latency,
            latency_spread=self.latency_spread,
            time_scale=1.0,
            requests_per_minute=self.requests_per_minute,
            rate_limit=self.rate_limit,
            max_in_flight=self.max_in_flight,
            retry_after_in="body",
            fault_5xx=self.read_fault_rate,
            fault_endpoints=("get",),
            seed=self.seed,
        )


@dataclass
class ProductionStack:
    """
    The running pieces of a production-shaped deployment.

    :param postgres: The metadata database's cluster.
    :param redis: The Redis server.
    :param emulator: The API emulator.
    :param image_url: Base URL of the image server.
    :param deployment: The Airflow deployment.
    :param images_dir: Where the served images are.
    """

    postgres: PostgresCluster
    redis: RedisServer
    emulator: EmulatorServer
    image_url: str
    deployment: AirflowDeployment
    images_dir: Path

    def images(self, prefix: str, count: int) -> list[str]:
        """
        URLs of ``count`` distinct images (copies of the samples named ``{prefix}-{n}.{ext}``).

        :param prefix: Names the set, so that several sets in one emulator ledger stay apart.
        :param count: How many.
        """
        return [f"{self.image_url}/{name}" for name in numbered_images(self.images_dir, prefix, count)]

    def creates_per_image(self, urls: list[str]) -> dict[str, int]:
        """The emulator's creates of each image (captions), keyed by file name."""
        by_input = self.emulator.ledger()["creates_by_input"]
        return {
            name: int(by_input.get(f"{name}|caption", 0)) for name in (u.rsplit("/", 1)[-1] for u in urls)
        }

    def rate_limit_lessons(self) -> list[str]:
        """The lessons of the limit's shape the deployment's budgets noted in Redis (one per API key)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis.port, decode_responses=True)
        try:
            values = [client.get(key) for key in client.scan_iter("blip2:budget:*:notes:rate_limit_shape")]
            return sorted(str(value) for value in values if value)  # one may expire between the two
        finally:
            client.close()

    def explain(self, tail: int = 4000, *, dag_id: str | None = None, run_id: str | None = None) -> str:
        """
        The end of every component's log and the emulator's ledger, for failure messages.

        :param tail: Characters of each log's end.
        :param dag_id: With ``run_id``: also the run's unsuccessful tasks and the end of their logs.
        :param run_id: The run.
        """
        logs = "\n".join(f"===== {name}\n{text[-tail:]}" for name, text in self.deployment.logs().items())
        tasks = self._unsuccessful_tasks(dag_id, run_id, tail) if dag_id and run_id else ""
        return f"{logs}\n===== emulator ledger\n{self.emulator.ledger()}{tasks}"

    def _unsuccessful_tasks(self, dag_id: str, run_id: str, tail: int) -> str:
        """The run's task instances that did not succeed, each with the end of its last try's log."""
        parts = []
        for ti in self.deployment.task_instances(dag_id, run_id):
            if ti["state"] == "success":
                continue
            map_index = ti.get("map_index", -1)
            parts.append(f"\n===== task {ti['task_id']}[{map_index}]: {ti['state']}, try {ti['try_number']}")
            folder = f"dag_id={dag_id}/run_id={run_id}/task_id={ti['task_id']}"
            logs = sorted(
                path
                for path in self.deployment.written_files()
                if folder in str(path) and (map_index < 0 or f"map_index={map_index}" in str(path))
            )
            if logs:
                parts.append(logs[-1].read_text(errors="replace")[-tail:])
        return "\n".join(parts)


def numbered_images(directory: Path, prefix: str, count: int) -> list[str]:
    """
    Link ``count`` sample images into ``directory`` under distinct names; return the names.

    :param directory: The served folder.
    :param prefix: The names' prefix.
    :param count: How many.
    """
    samples = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix in {".jpg", ".png", ".webp"})
    names = []
    for n in range(count):
        sample = samples[n % len(samples)]
        name = f"{prefix}-{n:04d}{sample.suffix}"
        target = directory / name
        if not target.exists():
            shutil.copyfile(sample, target)
        names.append(name)
    return names


def connections(
    emulator_url: str, redis: RedisServer, settings: ProductionSettings
) -> dict[str, dict[str, Any]]:
    """
    The deployment's connections: ``blip2_default`` to the emulator, ``redis_default`` to Redis, and
    ``blip2_shared``: the emulator with the budget in Redis at :data:`SHARED_REQUESTS_PER_MINUTE`; and
    ``blip2_uploads``: the budget in Redis at the emulator's own limit (the uploads DAG's).

    :param emulator_url: The emulator's base URL.
    :param redis: The Redis server.
    :param settings: Whether the blip2 connection names the Redis connection.
    """
    extra: dict[str, Any] = {"requests_per_minute": settings.requests_per_minute, "max_concurrency": 10}
    if settings.redis_in_connection:
        extra["redis_conn_id"] = "redis_default"
    shared = {
        "requests_per_minute": SHARED_REQUESTS_PER_MINUTE,
        "max_concurrency": 10,
        "redis_conn_id": "redis_default",
    }
    return {
        "blip2_default": {"conn_type": "blip2", "host": emulator_url, "password": API_KEY, "extra": extra},
        "blip2_shared": {"conn_type": "blip2", "host": emulator_url, "password": API_KEY, "extra": shared},
        "blip2_uploads": {
            "conn_type": "blip2",
            "host": emulator_url,
            "password": API_KEY,
            "extra": shared | {"requests_per_minute": settings.requests_per_minute},
        },
        "redis_default": {"conn_type": "redis", "host": "127.0.0.1", "port": redis.port, "extra": {"db": 0}},
    }


@contextlib.contextmanager
def production_stack(home: Path, settings: ProductionSettings | None = None) -> Iterator[ProductionStack]:
    """
    Start PostgreSQL, Redis, the emulator, an image server and the Airflow deployment; stop them all.

    :param home: An empty folder for the Airflow home and the served images.
    :param settings: The stack's shape; the defaults are production's.
    """
    settings = settings or ProductionSettings()
    images_dir = home / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(PostgresCluster())
        redis = stack.enter_context(RedisServer())
        emulator = stack.enter_context(EmulatorServer(settings.emulator_config()))
        image_url = stack.enter_context(serve_directory(images_dir))
        sandbox = AirflowSandbox(
            home / "airflow",
            dags_folder=SYSTEM_DAGS,
            connections=connections(emulator.url, redis, settings),
            extra_env=settings.extra_env,
            sql_alchemy_conn=postgres.url,
        )
        sandbox.migrate()
        deployment = AirflowDeployment(
            sandbox,
            parallelism=settings.parallelism,
            triggerers=settings.triggerers,
            celery=settings.celery(redis),
        )
        stack.enter_context(deployment)
        yield ProductionStack(postgres, redis, emulator, image_url, deployment, images_dir)
