"""
What importing the operator module costs a DAG file, on top of ``import airflow.sdk``.

DAG files are parsed on every scheduler loop, so the operator module must stay light: no
HTTP clients, storage SDKs or aiohttp at import time. Prints medians of the CPU time of fresh interpreters.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys

RUNS = 9
BASELINE = "import airflow.sdk; from airflow.sdk import DAG, BaseOperator"
CANDIDATE = BASELINE + "; from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator"
HEAVY_MODULES = ("boto3", "botocore", "google.cloud", "aiohttp", "fastapi", "PIL", "tenacity", "requests")


def cpu_time(code: str) -> float:
    """CPU seconds (user + system) a fresh interpreter spends running ``code``; steadier than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_modules_loaded() -> list[str]:
    """Which of HEAVY_MODULES the operator import pulls in beyond the baseline."""
    probe = (
        f"import sys; {BASELINE}; before = set(sys.modules); "
        "from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator; "
        f"new = set(sys.modules) - before; print(','.join(m for m in {HEAVY_MODULES!r} if m in new))"
    )
    output = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return [name for name in output.stdout.strip().split(",") if name]


def main() -> None:
    """Print the median cost of each import, alternating runs to share the machine's noise."""
    cpu_time(CANDIDATE)  # warm the file cache and bytecode
    baseline: list[float] = []
    candidate: list[float] = []
    for _ in range(RUNS):
        baseline.append(cpu_time(BASELINE))
        candidate.append(cpu_time(CANDIDATE))
    base, cand = statistics.median(baseline), statistics.median(candidate)
    print(f"import airflow.sdk (+DAG, BaseOperator): median {base * 1000:.0f} ms CPU over {RUNS} runs")
    print(f"... + Blip2PredictionOperator:            median {cand * 1000:.0f} ms")
    print(f"extra cost of the operator module:        {(cand - base) * 1000:+.0f} ms ({cand / base:.2f}x)")
    print(f"heavy modules pulled in by the operator:  {heavy_modules_loaded() or 'none'}")


if __name__ == "__main__":
    main()
