"""A throwaway PostgreSQL cluster on 127.0.0.1 for Airflow's metadata database."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from scripts.ports import free_port

POSTGRES_USER = "postgres"
INITDB_GLOB = "/usr/lib/postgresql/*/bin/initdb"


def postgres_bin_dir() -> Path | None:
    """The ``bin`` folder of the newest PostgreSQL installed from Debian packages, or None."""
    found = sorted(glob.glob(INITDB_GLOB), key=lambda path: int(Path(path).parts[4]))
    return Path(found[-1]).parent if found else None


def postgres_missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if postgres_bin_dir() is None:
        return "PostgreSQL is not installed (make system-packages installs it as root)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser is missing: PostgreSQL cannot run as root"
    return None


class PostgresCluster:
    """
    A PostgreSQL cluster of its own: initdb, start on a free loopback port, one database and role.

    Data directory, socket directory and log file live in one folder under a fresh temporary
    directory, owned by the ``postgres`` user when run as root (PostgreSQL refuses to run as root).
    Authentication is ``trust``: only this machine's loopback can reach it. Stopped and deleted on exit::

        with PostgresCluster() as cluster:
            url = cluster.url  # postgresql+psycopg2://airflow:airflow@127.0.0.1:PORT/airflow

    :param database: The database to create.
    :param user: The role that owns it (its password is its name).
    :param max_connections: ``max_connections`` of the server; every Airflow process holds a pool.
    :param start_timeout: Seconds to wait for the server to accept connections.
    """

    def __init__(
        self,
        *,
        database: str = "airflow",
        user: str = "airflow",
        max_connections: int = 300,
        start_timeout: float = 60.0,
    ) -> None:
        self.database = database
        self.user = user
        self.max_connections = max_connections
        self.start_timeout = start_timeout
        self.port = 0
        self.root: Path | None = None
        self._bin: Path | None = None

    @property
    def folder(self) -> Path:
        """The folder holding the data directory, the socket and the log."""
        if self.root is None:
            raise RuntimeError("the PostgreSQL cluster is not started")
        return self.root / "pg"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        """The server's log file."""
        return self.folder / "postgres.log"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database (psycopg2 driver)."""
        return f"postgresql+psycopg2://{self.user}:{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def async_url(self) -> str:
        """The SQLAlchemy URL of the database for the async engine (asyncpg driver)."""
        return f"postgresql+asyncpg://{self.user}:{self.user}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> PostgresCluster:
        """
        Create the cluster, start it and create the database and role.

        :raises RuntimeError: when PostgreSQL is missing or does not start.
        """
        reason = postgres_missing_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self._bin = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="blip2-pg-"))
        self.folder.mkdir()
        if os.geteuid() == 0:
            self.root.chmod(0o755)  # the postgres user must reach its folder
            shutil.chown(self.folder, user=POSTGRES_USER, group=POSTGRES_USER)
        self.port = free_port()
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            self._pg_ctl(
                "start",
                "-w",
                "-t",
                str(int(self.start_timeout)),
                "-l",
                str(self.log_file),
                "-o",
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
                f"-c max_connections={self.max_connections} -c fsync=off",
            )
            self._psql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.user}'")
            self._psql(f"CREATE DATABASE {self.database} OWNER {self.user}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown), wait for it and delete the cluster. Safe to call twice."""
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            pid = self._postmaster_pid()
            try:
                self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
            except (RuntimeError, subprocess.TimeoutExpired):
                if pid is not None:
                    _kill_and_wait(pid)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PostgresCluster:
        """Start the cluster."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop and delete the cluster."""
        self.stop()

    def log(self) -> str:
        """The server's log so far, for failure messages."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), *args, action)

    def _psql(self, sql: str) -> None:
        self._run(
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            POSTGRES_USER,
            "-d",
            "postgres",
            "-c",
            sql,
        )

    def _run(self, program: str, *args: str) -> None:
        assert self._bin is not None
        command = [str(self._bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", POSTGRES_USER, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, check=False, cwd=self.folder
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`{program} {' '.join(args)}` exited {result.returncode}:\n{result.stdout}{result.stderr}"
                f"\n--- server log ---\n{self.log()[-4000:]}"
            )


def _kill_and_wait(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL a process that is not our child and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
