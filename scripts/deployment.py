"""A real Airflow deployment on loopback: API server, scheduler, DAG processor and one or more triggerers."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from scripts.ports import free_port
from scripts.sandbox import AirflowSandbox

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
COMPONENT_ENV = "BLIP2_DEPLOYMENT_COMPONENT"
"""Set in a named component's environment; :func:`component_hostname` reports it as the host name."""
PAGE_LIMIT = 100
"""Items per page of the REST API's lists (``[api] maximum_page_limit`` is 100 by default)."""

__all__ = [
    "COMPONENTS",
    "AirflowDeployment",
    "CeleryWorkers",
    "RunSummary",
    "component_hostname",
    "free_port",
]


def component_hostname() -> str:
    """
    The host name a component reports to Airflow (``[core] hostname_callable``).

    Named triggerers run on one machine but must be told apart in the ``job`` table: each gets its
    component name (``triggerer-1``, ...) as its host name.
    """
    return os.environ.get(COMPONENT_ENV) or socket.getfqdn()


@dataclass(frozen=True)
class CeleryWorkers:
    """
    Run the tasks on Celery workers (CeleryExecutor) instead of LocalExecutor.

    The workers are the components ``worker-1`` ... ``worker-N``; each reports its name as the host
    name of the task instances it runs. Celery's results go to the metadata database.

    :param broker_url: The Celery broker, for example ``redis://127.0.0.1:6379/1``.
    :param workers: How many workers, each its own process.
    :param concurrency: Task processes per worker.
    """

    broker_url: str
    workers: int = 2
    concurrency: int = 4

    @property
    def names(self) -> tuple[str, ...]:
        """The workers' component names."""
        return tuple(f"worker-{n}" for n in range(1, self.workers + 1))

    def env(self, sql_alchemy_conn: str) -> dict[str, str]:
        """
        The Airflow settings of a CeleryExecutor deployment.

        :param sql_alchemy_conn: The metadata database, which also keeps Celery's results.
        """
        return {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{sql_alchemy_conn}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
        }


@dataclass(frozen=True)
class RunSummary:
    """
    The task instances of one DAG run, counted.

    :param states: Number of task instances per state (``None`` counts as ``"none"``).
    :param try_numbers: Try number per task instance, keyed ``task_id`` or ``task_id[map_index]``.
    """

    states: dict[str, int]
    try_numbers: dict[str, int]

    @property
    def total(self) -> int:
        """Number of task instances."""
        return sum(self.states.values())

    @property
    def retried(self) -> list[str]:
        """The task instances that needed more than one try."""
        return sorted(key for key, tries in self.try_numbers.items() if tries > 1)


class AirflowDeployment:
    """
    Every Airflow component as its own process, sharing the sandbox's metadata database.

    LocalExecutor runs the tasks, or with ``celery`` the Celery workers do; the triggerer(s) run
    deferred tasks' triggers; the REST API triggers
    runs and marks task instances. Without ``users`` everyone is admin without logging in; with them,
    the simple auth manager knows only those admins, who log in on its login page, and
    :meth:`api` calls the REST API with a token of the first one. Logs go to ``<home>/component-logs``, one
    file per component; no component serves logs over HTTP (the API server reads the shared log folder).

    With ``triggerers=1`` the triggerer is the component ``triggerer``. With more, they are
    ``triggerer-1`` ... ``triggerer-N``, each its own process and log, reporting its name as its host
    name, and considered dead ``triggerer_health_check_threshold`` seconds after its last heartbeat, when
    the others take over its triggers. Several triggerers need a database with ``SKIP LOCKED``
    (PostgreSQL): on SQLite two triggerers can run the same trigger.

    :param sandbox: The migrated Airflow home, its connections, DAGs folder and metadata database.
    :param parallelism: Task instances running at once (``[core] parallelism``): LocalExecutor's
        slots, or the scheduler's cap on what it sends to the Celery workers.
    :param triggerers: How many triggerers to run.
    :param triggerer_health_check_threshold: Seconds without a heartbeat (sent every second) after
        which a triggerer counts as dead, with several triggerers.
    :param users: Admin user name -> password for the simple auth manager; None: no login at all.
    :param celery: Celery workers to run the tasks on; None: LocalExecutor.
    :raises ValueError: when several triggerers, or Celery workers, are asked for on SQLite.
    """

    def __init__(
        self,
        sandbox: AirflowSandbox,
        *,
        parallelism: int = 4,
        triggerers: int = 1,
        triggerer_health_check_threshold: int = 15,
        users: dict[str, str] | None = None,
        celery: CeleryWorkers | None = None,
    ) -> None:
        if triggerers < 1:
            raise ValueError("a deployment needs at least one triggerer")
        if triggerers > 1 and sandbox.uses_sqlite:
            raise ValueError(
                "two triggerers on SQLite can run the same trigger (no SKIP LOCKED): "
                "give the sandbox a PostgreSQL database (scripts.postgres.PostgresCluster)"
            )
        if celery is not None and sandbox.uses_sqlite:
            raise ValueError("Celery workers need a metadata database they can share: not SQLite")
        self.celery = celery
        self.sandbox = sandbox
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        self.triggerers: tuple[str, ...] = (
            ("triggerer",) if triggerers == 1 else tuple(f"triggerer-{n}" for n in range(1, triggerers + 1))
        )
        self.workers: tuple[str, ...] = celery.names if celery else ()
        self.components: tuple[str, ...] = (*COMPONENTS[:-1], *self.triggerers, *self.workers)
        self.log_dir = sandbox.home / "component-logs"
        self.log_dir.mkdir(exist_ok=True)
        sandbox.extra_env.update(
            {
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(sandbox.home / "logs"),
            }
        )
        if celery is not None:
            sandbox.extra_env.update(celery.env(sandbox.sql_alchemy_conn))
        if triggerers > 1:
            sandbox.extra_env["AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD"] = str(
                triggerer_health_check_threshold
            )
        self.users = dict(users or {})
        self._token: str | None = None
        if self.users:
            passwords = sandbox.home / "simple_auth_manager_passwords.json"
            passwords.write_text(json.dumps(self.users))
            admins = ",".join(f"{name}:ADMIN" for name in self.users)
            sandbox.extra_env.update(
                {
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": admins,
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                }
            )

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of a component."""
        env = self.sandbox.env()
        if name in self.workers:
            # Each worker is a Celery node of its own name; --skip-serve-logs as below.
            args = [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname", f"{name}@%h"]
            args += ["--skip-serve-logs", "--without-gossip", "--without-mingle"]
        else:
            program = "triggerer" if name in self.triggerers else name
            args = [sys.executable, "-m", "airflow", program]
        if name == "api-server":
            args += ["--port", str(self.port), "--host", "127.0.0.1"]
        if name in ("scheduler", *self.triggerers):
            args.append("--skip-serve-logs")  # the API server reads the shared log folder
        if name in self.workers or name.startswith("triggerer-"):
            env[COMPONENT_ENV] = name
            env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = f"{__name__}.component_hostname"
        return args, env

    def start(self, *components: str) -> None:
        """
        Start components (all by default) and wait for the API server to answer.

        :param components: Component names, from :attr:`components`.
        """
        for name in components or self.components:
            if name not in self.components:
                raise ValueError(f"unknown component {name!r}; this deployment has {self.components}")
            args, env = self._command(name)
            with (self.log_dir / f"{name}.log").open("ab") as log:
                self.processes[name] = subprocess.Popen(
                    args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        self.wait_for(lambda: self._api_ready(), timeout=120, what="the API server")

    def stop(self, *components: str, kill: bool = False) -> None:
        """
        Stop components (all by default) at once, waiting for each process and all its children to exit.

        :param components: Component names.
        :param kill: SIGKILL instead of SIGTERM (a crash: nothing is cleaned up).
        """
        stopping: list[tuple[subprocess.Popen[bytes], list[psutil.Process]]] = []
        for name in components or list(self.processes):
            process = self.processes.pop(name, None)
            if process is None:
                continue
            tree = _process_tree(process.pid)
            if name in self.paused:
                self._signal(tree, process.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
                self.paused.discard(name)
            if process.poll() is None:
                self._signal(tree, process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            stopping.append((process, tree))
        for process, tree in stopping:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(tree, process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            _kill_survivors(tree)

    def kill(self, name: str) -> None:
        """
        SIGKILL a component and its children, as an OOM kill or a lost machine would; wait for them.

        :param name: The component, e.g. ``triggerer-1``.
        """
        self.stop(name, kill=True)

    def restart(self, name: str) -> None:
        """
        Stop a component gracefully (SIGTERM) and start it again.

        :param name: The component.
        """
        self.stop(name)
        self.start(name)

    def pause(self, name: str) -> None:
        """
        SIGSTOP a component and its children: it stays alive but stops heartbeating, as a hung
        machine or a long garbage collection would. :meth:`resume` continues it.

        :param name: The component.
        """
        process = self.processes[name]
        self._signal(_process_tree(process.pid), process.pid, signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        """
        SIGCONT a component paused by :meth:`pause`.

        :param name: The component.
        """
        process = self.processes[name]
        self._signal(_process_tree(process.pid), process.pid, signal.SIGCONT)
        self.paused.discard(name)

    def running(self, name: str) -> bool:
        """
        Whether a component's process is running (a paused one counts as running).

        :param name: The component.
        """
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    @staticmethod
    def _signal(tree: list[psutil.Process], pgid: int, signum: signal.Signals) -> None:
        """Signal the process group, then any process of the tree that left it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)
        for child in tree:
            try:
                if os.getpgid(child.pid) != pgid:
                    child.send_signal(signum)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue

    def __enter__(self) -> AirflowDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the REST API (``/api/v2`` + path) and return the JSON answer."""
        headers = dict(kwargs.pop("headers", None) or {})
        if self.users:
            headers.setdefault("Authorization", f"Bearer {self._access_token()}")
        response = httpx.request(method, f"{self.url}/api/v2{path}", timeout=30, headers=headers, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def _access_token(self) -> str:
        """A REST API token of the first user (fetched once)."""
        if self._token is None:
            username, password = next(iter(self.users.items()))
            response = httpx.post(
                f"{self.url}/auth/token", json={"username": username, "password": password}, timeout=30
            )
            response.raise_for_status()
            self._token = str(response.json()["access_token"])
        return self._token

    @staticmethod
    def wait_for(condition: Any, *, timeout: float, what: str, interval: float = 0.5) -> Any:
        """Poll ``condition()`` until it returns something truthy; raise after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := condition():
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a DAG run once the DAG is parsed; return its run id."""
        self.wait_for(lambda: self._dag_parsed(dag_id), timeout=180, what=f"DAG {dag_id} to be parsed")
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return str(run["dag_run_id"])

    def _dag_parsed(self, dag_id: str) -> bool:
        try:
            self.api("GET", f"/dags/{dag_id}")
        except httpx.HTTPStatusError:
            return False
        return True

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        """The task instance as the REST API shows it."""
        return dict(self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"))

    def wait_for_task_state(
        self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float = 180
    ) -> dict[str, Any]:
        """Wait until the task instance is in one of ``states``; return it."""

        def reached() -> dict[str, Any] | None:
            ti = self.task_instance(dag_id, run_id, task_id)
            return ti if ti.get("state") in states else None

        return dict(self.wait_for(reached, timeout=timeout, what=f"{task_id} to reach {states}"))

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """Wait until the DAG run is finished; return its state."""

        def finished() -> str | None:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            return state if state in ("success", "failed") else None

        return str(self.wait_for(finished, timeout=timeout, what=f"run {run_id} to finish"))

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        """Mark a task instance as a user would in the UI."""
        self.api(
            "PATCH",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}",
            json={"new_state": state},
        )

    def logs(self) -> dict[str, str]:
        """Each component's output so far, for failure messages."""
        return {path.stem: path.read_text(errors="replace") for path in self.log_dir.glob("*.log")}

    def written_files(self) -> list[Path]:
        """Every file the deployment wrote: database, task logs, component logs."""
        return self.sandbox.written_files()

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """
        Every task instance of a DAG run (mapped ones one per map index), page by page.

        :param dag_id: The DAG.
        :param run_id: The run.
        """
        items: list[dict[str, Any]] = []
        while True:
            page = self.api(
                "GET",
                f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": PAGE_LIMIT, "offset": len(items), "order_by": "id"},
            )
            batch = page["task_instances"]
            items.extend(batch)
            if not batch or len(items) >= page["total_entries"]:
                return items

    def run_summary(self, dag_id: str, run_id: str) -> RunSummary:
        """
        The task instances of a run counted by state, and their try numbers.

        :param dag_id: The DAG.
        :param run_id: The run.
        """
        instances = self.task_instances(dag_id, run_id)
        states = Counter(str(ti["state"] or "none") for ti in instances)
        tries = {_ti_key(ti): int(ti["try_number"]) for ti in instances}
        return RunSummary(dict(states), tries)

    def deferred_by_triggerer(self, dag_id: str, run_id: str) -> dict[str, int]:
        """
        The run's deferred task instances per triggerer that runs their trigger (its host name;
        for named triggerers, their names); ``""`` counts those no triggerer has picked up yet.

        :param dag_id: The DAG.
        :param run_id: The run.
        """
        holders = Counter(
            str((ti.get("triggerer_job") or {}).get("hostname") or "")
            for ti in self.task_instances(dag_id, run_id)
            if ti["state"] == "deferred"
        )
        return dict(holders)

    def alive_triggerers(self) -> set[str]:
        """Host names of the triggerers the metadata database considers alive (named ones: their names)."""
        page = self.api(
            "GET", "/jobs", params={"job_type": "TriggererJob", "is_alive": True, "limit": PAGE_LIMIT}
        )
        return {str(job["hostname"]) for job in page["jobs"]}


def _ti_key(ti: dict[str, Any]) -> str:
    """``task_id``, or ``task_id[map_index]`` for a mapped task instance."""
    map_index = int(ti.get("map_index", -1))
    return str(ti["task_id"]) if map_index < 0 else f"{ti['task_id']}[{map_index}]"


def _process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants, as they are now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_survivors(tree: list[psutil.Process], timeout: float = 30.0) -> None:
    """SIGKILL what is left of a process tree (children that outlived their parent) and wait for it."""
    alive = [process for process in tree if process.is_running()]
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=timeout)
