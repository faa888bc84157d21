"""
`make demo`: run the example DAGs through a real `airflow dags test` against local servers.

No account and no network: the emulator of the Eachlabs API, a file server for the sample images
and a local S3 (moto) all listen on 127.0.0.1, and Airflow runs in a throwaway home under ``.demo/``.
The sample images are uploaded to the local S3 as the day's user uploads and as a product
catalogue; the moderation and alt-text DAGs then run batch tasks over those prefixes. The emulator
answers the moderation questions from a script (``MODERATION_ANSWERS``), so the report is known.
The moderation DAG runs a second night over the same uploads, answered from its result cache (no
create). The emulator offers the synchronous run (one request a prediction) to the moderation
batch, then refuses it (HTTP 400, as for a model without it) to the alt-text batch, which creates
and polls instead. Last,
the local moderation DAG moderates the sample images as files on the worker's disk, uploaded
through the upload endpoint, while the emulator reaches no image URL but its own uploaded copies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from example_dags.example_blip2_moderation import MODERATION_QUESTIONS
from scripts.sandbox import EXAMPLE_DAGS, REPO_ROOT, AirflowSandbox
from scripts.storage_servers import LocalS3, local_s3

DAG_ID = "example_blip2_caption"
API_KEY = "emulator-key"
IMAGES = sorted(p.name for p in (EXAMPLE_DAGS / "data").iterdir() if p.suffix in {".jpg", ".png", ".webp"})
UPLOADS_BUCKET = "user-uploads"
CATALOGUE_BUCKET = "catalogue"
#: What the emulator answers to the moderation questions: the rocket is taken for a weapon.
MODERATION_ANSWERS = {
    "answers": [
        {"image": "rocket.webp", "question": MODERATION_QUESTIONS["weapon"], "output": "yes"},
        *(
            {"image": name, "question": q, "output": "no"}
            for name in IMAGES
            for q in MODERATION_QUESTIONS.values()
        ),
    ]
}


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


def upload_samples(s3: LocalS3, day: str) -> None:
    """Put the sample images in the local S3: as the day's uploads and as a product catalogue."""
    s3.create_bucket(UPLOADS_BUCKET)
    s3.create_bucket(CATALOGUE_BUCKET)
    for name in IMAGES:
        data = (EXAMPLE_DAGS / "data" / name).read_bytes()
        s3.put_object(UPLOADS_BUCKET, f"uploads/{day}/user-{len(name)}/{name}", data)
        s3.put_object(CATALOGUE_BUCKET, f"products/{name}", data)
    s3.put_object(UPLOADS_BUCKET, f"uploads/{day}/notes.txt", b"not an image: the listing skips it")


def requests_between(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What the emulator saw between two ledgers: requests by endpoint and creates, as one line."""
    seen = {
        name: after["requests"].get(name, 0) - before["requests"].get(name, 0) for name in after["requests"]
    }
    runs = after.get("runs", 0) - before.get("runs", 0)
    refused = seen.get("run", 0) - runs
    parts = [f"{runs} synchronous runs", f"{refused} refused", f"{seen.get('create', 0)} creates"]
    parts.append(f"{seen.get('get', 0)} reads")
    return ", ".join(parts)


def uploads_between(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What the emulator's upload endpoint saw between two ledgers, as one line."""
    seen = {name: after["uploads"][name] - before["uploads"][name] for name in ("presigns", "puts", "reads")}
    return (
        f"{seen['presigns']} presigns, {seen['puts']} signed PUTs, {seen['reads']} predictions read an "
        f"uploaded copy; longest retention asked {after['uploads']['max_retention_s']:g} s"
    )


def run(sandbox: AirflowSandbox, dag_id: str, **kwargs: Any) -> dict[str, str]:
    """Run a DAG with ``airflow dags test``; return its task states."""
    print(f"Running `airflow dags test {dag_id}` ...")
    started = time.monotonic()
    sandbox.dags_test(dag_id, **kwargs)
    states = sandbox.task_states(dag_id)
    print(
        f"  {len(states)} task instances, {time.monotonic() - started:.1f} s: {sorted(set(states.values()))}"
    )
    if any(state != "success" for state in states.values()):
        raise RuntimeError(f"{dag_id} did not succeed: {states}")
    return states


def main() -> int:
    """Run the demo; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, default=REPO_ROOT / ".demo" / "airflow-home")
    parser.add_argument("--latency", type=float, default=2.0, help="emulated seconds per prediction")
    args = parser.parse_args()
    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    answers = args.home.parent / "moderation-answers.json"
    answers.write_text(json.dumps(MODERATION_ANSWERS, indent=2))
    today = datetime.datetime.now(datetime.timezone.utc).date()
    day, next_day = today.isoformat(), (today + datetime.timedelta(days=1)).isoformat()

    config = EmulatorConfig(api_keys=(API_KEY,), latency=args.latency, answers_file=str(answers))
    with EmulatorServer(config) as api, serve_directory(EXAMPLE_DAGS / "data") as images, local_s3() as s3:
        print(f"BLIP-2 API emulator on {api.url}; sample images on {images}; local S3 on {s3.endpoint_url}")
        upload_samples(s3, day)
        sandbox = AirflowSandbox(
            args.home,
            connections={
                "blip2_default": {"conn_type": "blip2", "host": api.url, "password": API_KEY},
                "aws_default": s3.connection(),
            },
        )
        print(f"Creating a throwaway Airflow home in {args.home} ...")
        sandbox.migrate()
        try:
            run(
                sandbox, "example_blip2_caption", conf={"image_urls": [f"{images}/{name}" for name in IMAGES]}
            )
            captions = sandbox.xcom("example_blip2_caption", "report")[0]
            before = api.ledger()
            run(sandbox, "example_blip2_moderation", logical_date=day)
            moderation_requests = requests_between(before, api.ledger())
            moderation = sandbox.xcom("example_blip2_moderation", "moderate")[0]
            flags = sandbox.xcom("example_blip2_moderation", "flag")[0]
            quarantined = sandbox.xcom("example_blip2_moderation", "quarantine")[0]
            before = api.ledger()
            run(sandbox, "example_blip2_moderation", logical_date=next_day)  # the same uploads again
            second_night = requests_between(before, api.ledger())
            second_summary = sandbox.xcom("example_blip2_moderation", "moderate")[0]
            api.config.sync_run = False  # the model "refuses" the synchronous run from now on
            before = api.ledger()
            run(sandbox, "example_blip2_alt_text", logical_date=day)
            alt_text_requests = requests_between(before, api.ledger())
            api.config.sync_run = True
            api.config.fetch_only_uploads = True  # a service that reaches no image URL but its uploads
            before = api.ledger()
            local_answers = args.home.parent / "local-moderation.jsonl"
            run(sandbox, "example_blip2_local_moderation", conf={"output": str(local_answers)})
            local_flags = sandbox.xcom("example_blip2_local_moderation", "flag")[0]
            local_uploads = uploads_between(before, api.ledger())
            alt_text = {
                name: s3.client()
                .get_object(Bucket=CATALOGUE_BUCKET, Key=f"products/{name}.alt.txt")["Body"]
                .read()
                .decode()
                for name in IMAGES
            }
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        ledger = api.ledger()

    print("\nexample_blip2_caption: one caption and one answer per image")
    print_table(captions, ["image", "caption", "answer"])
    print(f"\nexample_blip2_moderation: {moderation}")
    rows = [{"image": image, "flags": ", ".join(reasons)} for image, reasons in flags["flagged"].items()]
    rows += [{"image": image, "flags": "clean, published"} for image in flags["clean"]]
    print_table(rows, ["image", "flags"])
    print("quarantined: " + ", ".join(quarantined))
    print(f"the night's cost as the API reported it: {flags['cost']:g} ({flags['predictions']} predictions)")
    print(f"synchronous run offered: {moderation_requests}")
    print(
        f"the next night over the same uploads: {second_night}; {second_summary['cached']} answers "
        f"from the cache, cost {second_summary['cost']:g}, cost saved {second_summary['cost_saved']:g}"
    )
    print("\nexample_blip2_alt_text: products/<image>.alt.txt written next to each image")
    print_table([{"image": name, "alt text": text} for name, text in alt_text.items()], ["image", "alt text"])
    print(f"synchronous run refused (HTTP 400), so created and polled: {alt_text_requests}")
    print(f"\nexample_blip2_local_moderation: {local_flags['checked']} files from {EXAMPLE_DAGS / 'data'}")
    print_table(
        [{"file": name, "flags": ", ".join(reasons)} for name, reasons in local_flags["flagged"].items()],
        ["file", "flags"],
    )
    print(f"uploaded through the upload endpoint: {local_uploads}")
    print(
        f"\nThe emulator saw {ledger['creates']} creates, {sum(ledger['requests'].values())} requests and "
        f"{ledger['responses_429']} 429 answers. Outputs marked [emulated] come from the emulator, "
        "not from the model."
    )
    if ledger["responses_429"]:
        print(
            "The 429s: each `airflow dags test` is a new process whose request budget starts empty while "
            "the API still counts the previous run's requests; the client waited as Retry-After said."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
