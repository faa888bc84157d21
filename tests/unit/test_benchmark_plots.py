"""
The documentation's benchmark plots: drawn from the committed results, the same bytes every time.

Starts: nothing (no server, no Airflow): it draws the plots from the committed results.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from benchmarks.results import RESULTS_DIR

# The documentation's packages are in the main environment only, not in the Airflow 2.11 one.
pytest.importorskip("matplotlib")

from scripts.benchmark_plots import PLOTS, render_all


@pytest.fixture(scope="module")
def plots() -> dict[str, bytes]:
    return render_all()


def test_every_committed_result_has_a_plot(plots: dict[str, bytes]) -> None:
    benchmarks = {json.loads(path.read_text())["benchmark"] for path in RESULTS_DIR.glob("*.json")}
    drawn = {benchmark for name, (benchmark, _) in PLOTS.items() if name in plots}
    assert benchmarks, "no committed benchmark results"
    assert drawn == benchmarks
    for content in plots.values():
        assert ElementTree.fromstring(content).tag == "{http://www.w3.org/2000/svg}svg"


def test_the_same_results_draw_the_same_bytes(plots: dict[str, bytes], tmp_path: Path) -> None:
    # Copied elsewhere and drawn again later: nothing depends on the path, the time or ids.
    for path in RESULTS_DIR.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    assert render_all(tmp_path) == plots


def test_no_results_draw_nothing(tmp_path: Path) -> None:
    assert render_all(tmp_path) == {}


def test_the_deployment_benchmarks_draw_from_their_json(tmp_path: Path) -> None:
    # The shapes batch_deployment.py and scale.py write with --json (their runs take minutes).
    deployment = {"images": 100, "run": "success", "elapsed_s": 187.5, "minimum_s": 140.0, "ratio": 1.34}
    deployment |= {"creates": 100, "responses_429": 0, "requests": 200}
    run = {"tasks": 20, "batch_images": 20, "run": "success", "wall_s": 61.0, "minimum_s": 20.0}
    run |= {"ratio": 3.05, "share_429": 0.12, "creates": 40, "images": 40}
    documents = {
        "batch_deployment": {"benchmark": "batch_deployment", "parameters": {}, "results": deployment},
        "scale": {"benchmark": "scale", "parameters": {}, "results": {"runs": [run | {"redis": False}]}},
        "scale-redis": {"benchmark": "scale", "parameters": {}, "results": {"runs": [run | {"redis": True}]}},
    }
    for name, document in documents.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(document))
    plots = render_all(tmp_path)
    assert set(plots) == {"batch-deployment.svg", "scale.svg"}
    assert b"Redis budget" in plots["scale.svg"]
    assert b"per-process budgets" in plots["scale.svg"]
