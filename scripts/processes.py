"""Child processes of the tests, benchmarks and local servers."""

from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """
    Stop a child process: SIGTERM, then SIGKILL if it has not exited within ``timeout``; reap it.

    :param process: The child; one that has already exited is only reaped.
    :param timeout: Seconds to wait after each signal.
    """
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
