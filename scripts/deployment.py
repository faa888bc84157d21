"""A real Airflow deployment on loopback: API server, scheduler, DAG processor and triggerer."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.sandbox import AirflowSandbox

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AirflowDeployment:
    """
    Every Airflow component as its own process, sharing the sandbox's SQLite database.

    LocalExecutor runs the tasks; the triggerer runs deferred tasks' triggers; the REST API (all
    users admin) triggers runs and marks task instances. Logs go to ``<home>/component-logs``.

    :param sandbox: The migrated Airflow home, its connections and DAGs folder.
    """

    def __init__(self, sandbox: AirflowSandbox) -> None:
        self.sandbox = sandbox
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = sandbox.home / "component-logs"
        self.log_dir.mkdir(exist_ok=True)
        sandbox.extra_env.update(
            {
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(sandbox.home / "logs"),
            }
        )

    def start(self, *components: str) -> None:
        """Start components (all by default) and wait for the API server to answer."""
        for name in components or COMPONENTS:
            log = (self.log_dir / f"{name}.log").open("ab")
            args = [sys.executable, "-m", "airflow", name]
            if name == "api-server":
                args += ["--port", str(self.port), "--host", "127.0.0.1"]
            self.processes[name] = subprocess.Popen(
                args, env=self.sandbox.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_for(lambda: self._api_ready(), timeout=120, what="the API server")

    def stop(self, *components: str, kill: bool = False) -> None:
        """Stop components (all by default), waiting for each process group to exit."""
        for name in components or list(self.processes):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

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
        response = httpx.request(method, f"{self.url}/api/v2{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

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
