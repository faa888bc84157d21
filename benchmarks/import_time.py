"""
What importing the operator module costs a DAG file, on top of ``import airflow.sdk``.

DAG files are parsed on every scheduler loop, so the operator module must stay light: no HTTP
clients, storage SDKs or aiohttp at import time. Each measurement runs in a fresh interpreter:
first what a DAG file imports anyway (``airflow.sdk`` with ``DAG`` and ``BaseOperator``), then,
timed separately, the operator module on top. Prints medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.results import add_json_argument, write_results

RUNS = 9
BASELINE = "from airflow.sdk import DAG, BaseOperator"
OPERATOR = "airflow_provider_blip2.operators.blip2"
HEAVY_MODULES = (
    "boto3",
    "botocore",
    "google.cloud",
    "aiohttp",
    "fastapi",
    "PIL",
    "tenacity",
    "requests",
    "openlineage",
    "airflow.providers.openlineage.extractors",
)

PROBE = f"""
import json, sys, time
started = time.perf_counter()
import airflow.sdk
{BASELINE}
baseline = time.perf_counter() - started
before = set(sys.modules)
started = time.perf_counter()
import {OPERATOR}
operator = time.perf_counter() - started
new = set(sys.modules) - before
print(json.dumps({{"baseline": baseline, "operator": operator,
                  "heavy": [m for m in {HEAVY_MODULES!r} if m in new]}}))
"""


def measure() -> dict[str, float | list[str]]:
    """One fresh interpreter's import times, in seconds."""
    output = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True)
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def main() -> None:
    """Print the median cost of each import."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_json_argument(parser)
    args = parser.parse_args()
    measure()  # warm the file cache and bytecode
    runs = [measure() for _ in range(RUNS)]
    base = statistics.median(float(run["baseline"]) for run in runs)  # type: ignore[arg-type]
    extra = statistics.median(float(run["operator"]) for run in runs)  # type: ignore[arg-type]
    print(f"import airflow.sdk + DAG, BaseOperator: median {base * 1000:.0f} ms ({RUNS} fresh interpreters)")
    print(f"then import {OPERATOR}: median {extra * 1000:.1f} ms more ({(base + extra) / base:.3f}x)")
    print(f"heavy modules the operator pulls in: {runs[-1]['heavy'] or 'none'}")
    write_results(
        args.json,
        "import_time",
        {"runs": RUNS, "baseline": BASELINE, "module": OPERATOR},
        {
            "baseline_ms": [round(float(run["baseline"]) * 1000, 1) for run in runs],  # type: ignore[arg-type]
            "operator_ms": [round(float(run["operator"]) * 1000, 2) for run in runs],  # type: ignore[arg-type]
            "baseline_ms_median": round(base * 1000, 1),
            "operator_ms_median": round(extra * 1000, 2),
            "ratio": round((base + extra) / base, 4),
            "heavy_modules": runs[-1]["heavy"],
            "heavy_modules_checked": list(HEAVY_MODULES),
        },
    )


if __name__ == "__main__":
    main()
