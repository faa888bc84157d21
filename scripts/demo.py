"""
`make demo`: run the example DAG through a real `airflow dags test` against the local emulator.

No account and no network: the emulator of the Eachlabs API and a file server for the sample
images both listen on 127.0.0.1, and Airflow runs in a throwaway home under ``.demo/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from scripts.sandbox import EXAMPLE_DAGS, REPO_ROOT, AirflowSandbox

DAG_ID = "example_blip2_caption"
API_KEY = "emulator-key"
IMAGES = sorted(p.name for p in (EXAMPLE_DAGS / "data").iterdir() if p.suffix in {".jpg", ".png", ".webp"})


def print_table(rows: list[dict[str, str]], columns: list[str]) -> None:
    """Print rows as a plain-text table."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "+-" + "-+-".join("-" * widths[c] for c in columns) + "-+"
    print(line)
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print(line)
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns) + " |")
    print(line)


def main() -> int:
    """Run the demo; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, default=REPO_ROOT / ".demo" / "airflow-home")
    parser.add_argument("--latency", type=float, default=2.0, help="emulated seconds per prediction")
    args = parser.parse_args()
    shutil.rmtree(args.home, ignore_errors=True)

    config = EmulatorConfig(api_keys=(API_KEY,), latency=args.latency)
    with EmulatorServer(config) as api, serve_directory(EXAMPLE_DAGS / "data") as images:
        print(f"BLIP-2 API emulator on {api.url}; sample images on {images}")
        sandbox = AirflowSandbox(
            args.home,
            connections={"blip2_default": {"conn_type": "blip2", "host": api.url, "password": API_KEY}},
        )
        print(f"Creating a throwaway Airflow home in {args.home} ...")
        sandbox.migrate()
        urls = [f"{images}/{name}" for name in IMAGES]
        print(f"Running `airflow dags test {DAG_ID}` on {len(urls)} images (deferrable tasks) ...")
        started = time.monotonic()
        try:
            sandbox.dags_test(DAG_ID, conf={"image_urls": urls})
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        states = sandbox.task_states(DAG_ID)
        rows = sandbox.xcom(DAG_ID, "report")
        ledger = api.ledger()

    if not rows or any(state != "success" for state in states.values()):
        print(f"The DAG run did not succeed: {states}", file=sys.stderr)
        return 1
    print()
    print_table(rows[0], ["image", "caption", "answer"])
    print(
        f"\n{len(states)} task instances succeeded in {elapsed:.1f} s; the emulator saw "
        f"{ledger['creates']} creates and {sum(ledger['requests'].values())} requests in all. "
        "Outputs marked [emulated] come from the emulator, not from the model."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
