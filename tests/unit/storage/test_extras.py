"""
The amazon and google providers are optional extras, imported on first use only.

Starts: Python processes of their own (to see what is imported); no server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_provider_blip2.storage.errors import MissingExtraError, StorageError

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_loads_only_the_standard_library() -> None:
    result = run_python(
        """
        import json, sys
        before = set(sys.modules)
        import airflow_provider_blip2.storage
        print(json.dumps(sorted(set(sys.modules) - before)))
        """
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert "airflow_provider_blip2.storage" in loaded
    # Neither boto3, botocore, google.* nor airflow (so no airflow.providers.amazon/google): stdlib only.
    assert [m for m in loaded if m.split(".")[0] in {"boto3", "botocore", "google", "airflow"}] == []
    top_level = {m.split(".")[0] for m in loaded}
    assert top_level - set(sys.stdlib_module_names) == {"airflow_provider_blip2"}


@pytest.mark.parametrize(
    ("blocked", "uri", "extra"),
    [
        ("airflow.providers.amazon", "s3://bucket/key.jpg", "airflow-provider-blip2[amazon]"),
        ("airflow.providers.google", "gs://bucket/key.jpg", "airflow-provider-blip2[google]"),
    ],
)
def test_missing_extra(blocked: str, uri: str, extra: str) -> None:
    result = run_python(
        f"""
        import sys
        from airflow_provider_blip2.storage import MissingExtraError, ObjectStorage
        sys.modules[{blocked!r}] = None
        storage = ObjectStorage()
        sign = lambda u: storage.signed_url(u, expires_in=60)
        for call in (storage.read_bytes, storage.check_exists, sign):
            try:
                call({uri!r})
            except MissingExtraError as error:
                assert error.__cause__ is None and error.__suppress_context__
                print(error)
            else:
                print("no error")
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    scheme = uri.split("://")[0]
    assert all(line.startswith(f"{scheme}:// URIs need the ") and extra in line for line in lines), lines
    assert issubclass(MissingExtraError, StorageError)
