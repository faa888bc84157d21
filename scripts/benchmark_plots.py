"""
Draw the documentation's benchmark plots from the benchmarks' JSON results.

``make bench`` writes one JSON file per benchmark to ``benchmarks/results/``
(``benchmarks/results.py`` says what they hold). The documentation build calls :func:`render_all`,
which reads them and returns one SVG per plot; nothing is fetched and the same results always give
the same bytes. Run ``python -m scripts.benchmark_plots --out DIR`` to write the SVGs to a folder.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.typing import RcKeyType

from benchmarks.results import RESULTS_DIR

#: Fixed so that the SVG's element ids, and so its bytes, do not change from build to build.
STYLE: dict[RcKeyType, Any] = {
    "svg.hashsalt": "airflow-provider-blip2",
    "svg.fonttype": "none",
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "x",
    "grid.alpha": 0.3,
}
MEASURED = "#5e35b1"
MINIMUM = "#c62828"
REJECTED = "#ef6c00"
OTHER = "#9e9e9e"


def load(results_dir: Path, benchmark: str) -> list[dict[str, Any]]:
    """
    The result documents of one benchmark (``<benchmark>.json`` and ``<benchmark>-*.json``), by name.

    :param results_dir: The folder of the JSON files.
    :param benchmark: The benchmark's module name, e.g. ``"budget"``.
    """
    paths = sorted(results_dir.glob(f"{benchmark}.json")) + sorted(results_dir.glob(f"{benchmark}-*.json"))
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]


def svg(figure: Figure) -> bytes:
    """
    The figure as SVG, without a creation date.

    :param figure: The figure.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def footer(figure: Figure, documents: list[dict[str, Any]]) -> None:
    """
    Say under the plot when, and on how loaded a machine, the results were recorded.

    :param figure: The figure.
    :param documents: The result documents drawn in it.
    """
    notes = []
    for document in documents:
        machine = document.get("machine", {})
        load = machine.get("load_average")
        note = f"recorded {document.get('recorded_at', '?')[:10]} on {machine.get('cpus', '?')} CPUs"
        if load:
            note += f", load average {load[0]:g}"
        notes.append(note)
    text = "; ".join(dict.fromkeys(notes))
    figure.draw_without_rendering()
    box = figure.get_tightbbox()  # inches, everything drawn so far
    width, height = figure.get_size_inches()
    figure.text(
        box.x0 / width,
        (box.y0 - 0.05) / height,
        f"{text} (benchmarks/results/)",
        fontsize=7,
        color=OTHER,
        va="top",
    )


def legend(axes: Any) -> None:
    """
    Put the axes' legend to their right, clear of the bars and their labels.

    :param axes: The axes.
    """
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def bar_labels(axes: Any, bars: Any, labels: list[str]) -> None:
    """
    Write a label at the end of each horizontal bar.

    :param axes: The axes.
    :param bars: The bar container.
    :param labels: One label per bar.
    """
    axes.bar_label(bars, labels=labels, padding=3, fontsize=9)


def plot_import_time(documents: list[dict[str, Any]]) -> Figure:
    """
    What importing the operator module adds to a DAG file's own imports.

    :param documents: The ``import_time`` results; the first is drawn.
    """
    results = documents[0]["results"]
    figure = Figure(figsize=(7.5, 2.4))
    axes = figure.subplots()
    base, extra = results["baseline_ms_median"], results["operator_ms_median"]
    axes.barh([0], [base], color=OTHER, label="from airflow.sdk import DAG, BaseOperator")
    axes.barh([0], [extra], left=[base], color=MEASURED, label=f"then the operator module: +{extra:.0f} ms")
    axes.set_yticks([0], [f"median of {len(results['baseline_ms'])}\nfresh interpreters"])
    axes.set_xlabel("import time (ms)")
    heavy = ", ".join(results["heavy_modules"]) or "none"
    axes.set_title(f"Operator import: {results['ratio']:.3f}x the baseline; heavy modules loaded: {heavy}")
    legend(axes)
    axes.set_xlim(0, (base + extra) * 1.25)
    return figure


def plot_budget(documents: list[dict[str, Any]]) -> Figure:
    """
    Wall time of N predictions through one process's budget, against the minimum the limits allow.

    :param documents: The ``budget`` results; the first is drawn.
    """
    document = documents[0]
    results, parameters = document["results"], document["parameters"]
    scenarios = results["scenarios"]
    figure = Figure(figsize=(7.5, 2.6))
    axes = figure.subplots()
    positions = list(range(len(scenarios)))
    bars = axes.barh(positions, [s["wall_s"] for s in scenarios], color=MEASURED)
    bar_labels(
        axes,
        bars,
        [f"{s['ratio']:.2f}x minimum, {s['responses_429']} 429s, {s['requests']} req." for s in scenarios],
    )
    axes.axvline(results["minimum_s"], color=MINIMUM, linestyle="--", label="minimum the limits allow")
    axes.set_yticks(positions, [s["label"] for s in scenarios])
    axes.invert_yaxis()
    axes.set_xlabel(f"wall time (s, emulator time scaled {parameters['time_scale']:g}x)")
    axes.set_title(f"{parameters['predictions']} predictions at 60 requests/min and 10 in flight")
    axes.set_xlim(0, max(s["wall_s"] for s in scenarios) * 1.9)
    legend(axes)
    return figure


def plot_batch(documents: list[dict[str, Any]]) -> Figure:
    """
    One batch task at the API's limits: its elapsed time, and its requests with the 429s among them.

    :param documents: The ``batch`` results; the first is drawn.
    """
    document = documents[0]
    results, parameters = document["results"], document["parameters"]
    scenarios = results["scenarios"]
    figure = Figure(figsize=(7.5, 4.2))
    time_axes, request_axes = figure.subplots(2, 1)
    positions = list(range(len(scenarios)))
    labels = [s["label"] for s in scenarios]
    bars = time_axes.barh(positions, [s["elapsed_s"] for s in scenarios], color=MEASURED)
    bar_labels(time_axes, bars, [f"{s['ratio']:.2f}x" for s in scenarios])
    time_axes.axvline(results["minimum_s"], color=MINIMUM, linestyle="--", label="minimum the limits allow")
    time_axes.set_yticks(positions, labels)
    time_axes.invert_yaxis()
    time_axes.set_xlabel(f"elapsed (s, emulator time scaled {parameters['time_scale']:g}x)")
    time_axes.set_xlim(0, max(s["elapsed_s"] for s in scenarios) * 1.25)
    legend(time_axes)
    time_axes.set_title(f"One batch task, {parameters['images']} images, in airflow dags test")
    admitted = [s["requests"] - s["responses_429"] for s in scenarios]
    request_axes.barh(positions, admitted, color=MEASURED, label="requests answered")
    rejected = request_axes.barh(
        positions, [s["responses_429"] for s in scenarios], left=admitted, color=REJECTED, label="429"
    )
    bar_labels(
        request_axes,
        rejected,
        [f"{s['requests'] / parameters['images']:.2f} per image, {s['failed']} failed" for s in scenarios],
    )
    request_axes.axvline(2 * parameters["images"], color=MINIMUM, linestyle="--", label="2 per image")
    request_axes.set_yticks(positions, labels)
    request_axes.invert_yaxis()
    request_axes.set_xlabel("requests the emulator received")
    request_axes.set_xlim(0, max(s["requests"] for s in scenarios) * 1.45)
    legend(request_axes)
    figure.subplots_adjust(hspace=0.7)
    return figure


def plot_batch_deployment(documents: list[dict[str, Any]]) -> Figure:
    """
    A deferrable batch in a real deployment at the API's real speed, against the minimums.

    :param documents: The ``batch_deployment`` results; every one is drawn.
    """
    figure = Figure(figsize=(7.5, 0.8 + 0.6 * len(documents)))
    axes = figure.subplots()
    runs = [document["results"] for document in documents]
    positions = list(range(len(runs)))
    bars = axes.barh(positions, [run["elapsed_s"] for run in runs], color=MEASURED)
    bar_labels(
        axes,
        bars,
        [
            f"{run['ratio']:.2f}x minimum"
            + (f" ({run['window_ratio']:.2f}x the window's)" if "window_ratio" in run else "")
            + f", {run['requests']} req., {run['responses_429']} 429s"
            for run in runs
        ],
    )
    for position, run in zip(positions, runs, strict=True):
        axes.plot([run["minimum_s"]] * 2, [position - 0.4, position + 0.4], color=MINIMUM, linestyle="--")
        if "window_minimum_s" in run:
            span = [position - 0.4, position + 0.4]
            axes.plot([run["window_minimum_s"]] * 2, span, color=MINIMUM, linestyle=":")
    axes.set_yticks(positions, [f"{run['images']} images" for run in runs])
    axes.set_xlabel(
        "elapsed (s; dashed: the minimum at one request a second,\n"
        "dotted: the least time the sliding 60 s window allows)"
    )
    axes.set_xlim(0, max(run["elapsed_s"] for run in runs) * 1.8)
    axes.set_title("A deferrable batch (the operator's defaults) in a real deployment")
    return figure


def plot_triggerer_load(documents: list[dict[str, Any]]) -> Figure:
    """
    Triggers in one event loop: the worst loop stalls, and the reads sent against those asked for.

    :param documents: The ``triggerer_load`` results; every one is drawn, fewest triggers first.
    """
    reports = sorted(
        (document["results"] for document in documents), key=lambda r: (r["triggers"], r["poll_interval"])
    )
    labels = [f"{r['triggers']:,} triggers, {r['poll_interval']:g} s" for r in reports]
    figure = Figure(figsize=(7.5, 1.6 + 1.1 * len(reports)))
    stall_axes, read_axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(reports)))
    height = 0.38
    stall_axes.barh(
        [p - height / 2 for p in positions],
        [r["startup_stall_max_s"] for r in reports],
        height,
        color=OTHER,
        label="during start-up",
    )
    stall_axes.barh(
        [p + height / 2 for p in positions],
        [r["steady_stall_max_s"] for r in reports],
        height,
        color=MEASURED,
        label="steady",
    )
    stall_axes.axvline(0.2, color=MINIMUM, linestyle="--", label="triggerer warns (0.2 s)")
    stall_axes.set_yticks(positions, labels)
    stall_axes.invert_yaxis()
    stall_axes.set_xlabel("worst loop stall (s)")
    stall_axes.legend(loc="upper left", bbox_to_anchor=(0.0, -0.35), fontsize=8, frameon=False, ncols=3)
    bars = read_axes.barh(positions, [r["reads_sent_ratio"] for r in reports], color=MEASURED)
    rates = [f"{r['reads_sent_per_s']:g} of {r['reads_asked_per_s']:g}/s" for r in reports]
    bar_labels(read_axes, bars, rates)
    read_axes.set_xlim(0, 1.8)
    read_axes.axvline(1.0, color=MINIMUM, linestyle="--")
    read_axes.set_xlabel("reads sent / reads asked for")
    figure.suptitle("Blip2PredictionTriggers in one event loop")
    return figure


@dataclass(frozen=True)
class Panel:
    """
    One side of a pair of horizontal bar charts: a value per run.

    :param values: One bar per run.
    :param labels: The label at the end of each bar.
    :param xlabel: What the values are.
    :param xmax: The axis's end (room for the labels).
    :param color: The bars' colour.
    :param reference: An x at which to draw the dashed minimum line, if any.
    """

    values: list[float]
    labels: list[str]
    xlabel: str
    xmax: float
    color: str = MEASURED
    reference: float | None = None


def paired_bars(runs: list[str], left: Panel, right: Panel, title: str) -> Figure:
    """
    Two horizontal bar charts side by side, one row per run, named on the left.

    :param runs: Each run's name.
    :param left: The left chart.
    :param right: The right chart.
    :param title: The figure's title.
    """
    figure = Figure(figsize=(7.5, 1.4 + 1.0 * len(runs)))
    positions = list(range(len(runs)))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, panel in zip(axes, (left, right), strict=True):
        bar_labels(ax, ax.barh(positions, panel.values, color=panel.color), panel.labels)
        if panel.reference is not None:
            ax.axvline(panel.reference, color=MINIMUM, linestyle="--")
        ax.set_xlabel(panel.xlabel)
        ax.set_xlim(0, panel.xmax)
    axes[0].set_yticks(positions, runs)
    axes[0].invert_yaxis()
    figure.suptitle(title)
    return figure


def ratio_panel(runs: list[dict[str, Any]], labels: list[str], xlabel: str) -> Panel:
    """
    Wall time against the minimum, with the dashed line at 1.

    :param runs: The runs, each with its ``ratio``.
    :param labels: The label at the end of each bar.
    :param xlabel: What the minimum is.
    """
    ratios = [run["ratio"] for run in runs]
    return Panel(ratios, labels, xlabel, xmax=max(ratios) * 1.9, reference=1.0)


def requests_panel(runs: list[dict[str, Any]], labels: list[str], xlabel: str) -> Panel:
    """
    Requests per prediction.

    :param runs: The runs, each with its ``requests_per_prediction``.
    :param labels: The label at the end of each bar.
    :param xlabel: The axis's name.
    """
    values = [run["requests_per_prediction"] for run in runs]
    return Panel(values, labels, xlabel, xmax=max(values) * 1.8)


def plot_scale(documents: list[dict[str, Any]]) -> Figure:
    """
    The production-shaped deployment, with per-process budgets and with the Redis budget, on
    LocalExecutor or on Celery workers.

    :param documents: The ``scale`` results; every run of every one is drawn.
    """
    runs = [run for document in documents for run in document["results"]["runs"]]
    workers = [document["parameters"].get("celery_workers", 0) for document in documents]
    names = [
        f"{'Redis budget' if run['redis'] else 'per-process budgets'}"
        f"{f', {celery} Celery workers' if celery else ''}\n"
        f"{run['tasks']} tasks + batch of {run['batch_images']}: run {run['run']}"
        + (f", {run['failed_tasks']} task(s) failed" if run.get("failed_tasks") else "")
        for document, celery in zip(documents, workers, strict=True)
        for run in document["results"]["runs"]
    ]
    shares = [run["share_429"] for run in runs]
    share = Panel(
        shares,
        [f"{value:.1%}" for value in shares],
        "share of responses answered 429",
        xmax=max(max(shares) * 1.5, 0.05),
        color=REJECTED,
    )
    wall = [
        f"{run['wall_s']:g} s; {run['creates']}/{run['images']} creates"
        + (f"; {run['window_ratio']:.2f}x the window's" if "window_ratio" in run else "")
        for run in runs
    ]
    return paired_bars(
        names,
        share,
        ratio_panel(runs, wall, "wall time / minimum the limits allow"),
        "Mapped tasks beside a batch: PostgreSQL, 8 task processes, 2 triggerers",
    )


def sync_run_variation(parameters: dict[str, Any]) -> str:
    """How a ``sync_run`` document's API differs from the real one (60 a minute, 2 s predictions)."""
    parts = []
    if parameters.get("requests_per_minute", 60) != 60:
        parts.append(f"{parameters['requests_per_minute']}/min")
    latency = f"{parameters.get('latency', 2.0):g} s"
    if parameters.get("latency_spread"):
        parts.append(f"{latency} \u00b1 {parameters['latency_spread']:.0%}")
    elif parameters.get("latency", 2.0) != 2.0:
        parts.append(latency)
    return f" ({', '.join(parts)})" if parts else ""


def plot_sync_run(documents: list[dict[str, Any]]) -> Figure:
    """
    The synchronous run offered and refused: requests a prediction and wall time against the minimum.

    :param documents: The ``sync_run`` results; every scenario of every one is drawn.
    """
    pairs = [(document, run) for document in documents for run in document["results"]["runs"]]
    runs = [run for _, run in pairs]
    names = [
        f"{'200-image batch' if run['scenario'] == 'batch' else '100 mapped + 100-image batch'}"
        f"{sync_run_variation(document['parameters'])}\n"
        f"synchronous run {run['sync_run']}, API limit a {run.get('rate_limit', 'window')}: run {run['run']}"
        for document, run in pairs
    ]
    requests = [f"{run['requests_per_prediction']:.2f}; {run['share_429']:.1%} 429" for run in runs]
    wall = [f"{run['wall_s']:g} s; {run['predictions_per_minute']:g}/min" for run in runs]
    return paired_bars(
        names,
        requests_panel(runs, requests, "requests per prediction (429 share)"),
        ratio_panel(runs, wall, "wall time / minimum (1 request a run, 2 a poll)"),
        "The synchronous run: PostgreSQL, 8 task processes, 2 triggerers, Redis budget",
    )


def plot_uploads(documents: list[dict[str, Any]]) -> Figure:
    """
    Uploaded images: requests per prediction against the least, and wall time against the minimum.

    :param documents: The ``uploads`` results; every scenario of every one is drawn.
    """
    runs = [run for document in documents for run in document["results"]["runs"]]
    names = [
        f"{run['images']} {'mapped tasks' if run['scenario'] == 'mapped' else 'files in a batch'}: "
        f"run {run['run']}"
        for run in runs
    ]
    requests = [
        f"{run['requests_per_prediction']:.2f} (least {run['least_requests_per_prediction']})" for run in runs
    ]
    wall = [f"{run['wall_s']:g} s; {run['predictions_per_minute']:g}/min" for run in runs]
    return paired_bars(
        names,
        requests_panel(runs, requests, "requests per prediction"),
        ratio_panel(runs, wall, "wall time / minimum for those requests"),
        "Uploaded images: a service that reaches no URL, PostgreSQL, 2 triggerers, Redis",
    )


def plot_cache(documents: list[dict[str, Any]]) -> Figure:
    """
    Nightly runs with a result cache: each night's API requests, and its task's wall time.

    :param documents: The ``cache`` results; the first is drawn.
    """
    nights = documents[0]["results"]["nights"]
    names = [f"{night['night']}: {night['cached']} of {night['images']} cached" for night in nights]
    requests = [float(night["api_requests"]) for night in nights]
    walls = [float(night["task_wall_s"]) for night in nights]
    return paired_bars(
        names,
        Panel(
            requests, [f"{night['creates']} creates" for night in nights], "API requests", max(requests) * 1.6
        ),
        Panel(
            walls,
            [f"{wall:g} s" for wall in walls],
            "task wall time (s, emulator time-scaled)",
            max(walls) * 1.5,
        ),
        "Nightly runs of a 1,000-image batch with a result cache",
    )


#: Plot file name -> (benchmark, drawing function).
PLOTS: dict[str, tuple[str, Callable[[list[dict[str, Any]]], Figure]]] = {
    "import-time.svg": ("import_time", plot_import_time),
    "budget.svg": ("budget", plot_budget),
    "batch.svg": ("batch", plot_batch),
    "batch-deployment.svg": ("batch_deployment", plot_batch_deployment),
    "triggerer-load.svg": ("triggerer_load", plot_triggerer_load),
    "scale.svg": ("scale", plot_scale),
    "sync-run.svg": ("sync_run", plot_sync_run),
    "uploads.svg": ("uploads", plot_uploads),
    "cache.svg": ("cache", plot_cache),
}


def render_all(results_dir: Path = RESULTS_DIR) -> dict[str, bytes]:
    """
    Draw every plot whose benchmark has results in ``results_dir``.

    :param results_dir: The folder of the JSON files.
    :return: Plot file name -> SVG bytes.
    """
    plots: dict[str, bytes] = {}
    with rc_context(STYLE):
        for name, (benchmark, draw) in PLOTS.items():
            documents = load(results_dir, benchmark)
            if documents:
                figure = draw(documents)
                footer(figure, documents)
                plots[name] = svg(figure)
    return plots


def main() -> None:
    """Write the plots to a folder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the SVG files to")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in render_all(args.results).items():
        (args.out / name).write_bytes(content)
        print(args.out / name)


if __name__ == "__main__":
    main()
