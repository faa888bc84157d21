"""A throwaway Airflow installation (home, metadata DB, env connections) for `airflow dags test`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DAGS = REPO_ROOT / "example_dags"


class AirflowSandbox:
    """
    An ``AIRFLOW_HOME`` of its own with a migrated metadata database: SQLite in the home, or a given one.

    Connections are passed as ``AIRFLOW_CONN_*`` variables, which the inline trigger of
    ``airflow dags test`` can see (connections stored in the database it cannot).

    :param home: Directory for ``AIRFLOW_HOME``; created if missing.
    :param dags_folder: The DAGs to load.
    :param connections: Connection id -> JSON connection (``conn_type``, ``host``, ``password``, ``extra``).
    :param extra_env: More environment variables for every Airflow command.
    :param sql_alchemy_conn: The metadata database's SQLAlchemy URL (for example a
        :class:`scripts.postgres.PostgresCluster`'s); None keeps a SQLite file in the home.
    :param python: The interpreter that runs Airflow. None: this one, with the checkout first on
        ``PYTHONPATH``. Another one (a virtualenv with the built wheel installed) runs from the home,
        without the checkout on its path, so it imports the provider it has installed.
    """

    def __init__(
        self,
        home: Path,
        *,
        dags_folder: Path = EXAMPLE_DAGS,
        connections: dict[str, dict[str, Any]] | None = None,
        extra_env: dict[str, str] | None = None,
        sql_alchemy_conn: str | None = None,
        python: Path | None = None,
    ) -> None:
        self.home = home
        self.sql_alchemy_conn = sql_alchemy_conn or f"sqlite:///{home / 'airflow.db'}"
        self.dags_folder = dags_folder
        self.connections = dict(connections or {})
        self.extra_env = dict(extra_env or {})
        self.python = python
        self.home.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        """The SQLite metadata database (when the sandbox uses SQLite)."""
        return self.home / "airflow.db"

    @property
    def uses_sqlite(self) -> bool:
        """Whether the metadata database is SQLite (which allows only one triggerer)."""
        return self.sql_alchemy_conn.startswith("sqlite")

    def env(self) -> dict[str, str]:
        """The environment of every Airflow command run in this sandbox."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
        inherited = env.pop("PYTHONPATH", None)
        if self.python is None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), inherited]))
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            }
        )
        for conn_id, conn in self.connections.items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
        env.update(self.extra_env)
        return env

    def airflow(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """
        Run an ``airflow`` CLI command; raise with its output when it fails.

        :param args: The command's arguments.
        :param timeout: Seconds before it is killed.
        """
        command = [str(self.python or sys.executable), "-m", "airflow", *args]
        # `python -m` puts the working directory on sys.path: another interpreter runs from the home.
        cwd = None if self.python is None else self.home
        result = subprocess.run(
            command, env=self.env(), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`airflow {' '.join(args)}` exited {result.returncode}\n"
                f"--- stdout ---\n{result.stdout[-20000:]}\n--- stderr ---\n{result.stderr[-20000:]}"
            )
        return result

    def migrate(self) -> None:
        """Create the metadata database (once)."""
        marker = self.home / ".migrated"
        if self.database.exists() if self.uses_sqlite else marker.exists():
            return
        self.airflow("db", "migrate")
        marker.touch()

    def dags_test(
        self, dag_id: str, conf: dict[str, Any] | None = None, *, logical_date: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """
        Run one DAG with ``airflow dags test``; deferred tasks run their trigger inline.

        :param dag_id: The DAG.
        :param conf: The run's conf.
        :param logical_date: The run's logical date (``YYYY-MM-DD``); default now.
        """
        args = ["dags", "test", dag_id, *([logical_date] if logical_date else [])]
        if conf is not None:
            args += ["--conf", json.dumps(conf)]
        return self.airflow(*args)

    def task_states(self, dag_id: str) -> dict[str, str]:
        """State of each task instance (``task_id`` or ``task_id[map_index]``) of the DAG's latest run."""
        rows = self._query(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ("
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1)",
            (dag_id, dag_id),
        )
        return {(t if m < 0 else f"{t}[{m}]"): s for t, m, s in rows}

    def xcom(self, dag_id: str, task_id: str, key: str = "return_value") -> list[Any]:
        """
        The XCom values of a task in the DAG's latest run, ordered by map index.

        :param dag_id: The DAG.
        :param task_id: The task.
        :param key: The XCom key.
        """
        rows = self._query(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ? AND run_id = ("
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1) ORDER BY map_index",
            (dag_id, task_id, key, dag_id),
        )
        return [json.loads(value) if isinstance(value, (str, bytes)) else value for (value,) in rows]

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self.uses_sqlite:
            with sqlite3.connect(self.database) as db:
                return db.execute(sql, params).fetchall()
        return self._query_sqlalchemy(sql, params)

    def _query_sqlalchemy(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a ``?``-style query on a database other than SQLite."""
        import sqlalchemy

        parts = sql.split("?")
        named = "".join(part + (f":p{i}" if i < len(parts) - 1 else "") for i, part in enumerate(parts))
        engine = sqlalchemy.create_engine(self.sql_alchemy_conn)
        try:
            with engine.connect() as db:
                result = db.execute(sqlalchemy.text(named), {f"p{i}": v for i, v in enumerate(params)})
                return [tuple(row) for row in result]
        finally:
            engine.dispose()

    def written_files(self) -> list[Path]:
        """Every file Airflow wrote in this home: logs, the database, config."""
        return [path for path in self.home.rglob("*") if path.is_file()]

    def written_contents(self) -> dict[Path, bytes]:
        """The bytes of every file Airflow wrote in this home, read now.

        A file that goes while the home is read (SQLite removes its ``-wal`` and ``-shm`` files when
        the last connection closes, after copying them into the database) is left out: what it held
        is in the database file, which is read after it.
        """
        contents: dict[Path, bytes] = {}
        for path in sorted(self.written_files(), key=lambda path: path == self.database):
            try:
                contents[path] = path.read_bytes()
            except FileNotFoundError:
                continue
        return contents
