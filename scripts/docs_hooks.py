"""
MkDocs hooks of the documentation site (``mkdocs.yml``).

- The connection page's field table and environment-variable example are generated from
  ``airflow_provider_blip2.client.settings`` (the list the connection form is built from), at the
  markers ``<!-- blip2:connection-fields -->`` and ``<!-- blip2:connection-env -->``.
- The benchmark plots are drawn from ``benchmarks/results/*.json`` by ``scripts/benchmark_plots.py``
  and added to the site as ``img/benchmarks/<name>.svg``.

Only light modules are imported: the client's settings (no Airflow) and matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

# MkDocs restores sys.path once this module is loaded: import this checkout's sources now, before
# any installed copy of the package.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from airflow_provider_blip2.client.settings import CONNECTION_FIELDS, DEFAULT_BASE_URL, UI_FIELD_BEHAVIOUR
    from airflow_provider_blip2.get_provider_info import get_provider_info
    from scripts.benchmark_plots import render_all
finally:
    sys.path.remove(str(ROOT))

FIELDS_MARKER = "<!-- blip2:connection-fields -->"
ENV_MARKER = "<!-- blip2:connection-env -->"
PLOTS_URI = "img/benchmarks"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def connection_fields_table() -> str:
    """The connection form's fields, in the order of the form, as a Markdown table."""
    relabel = UI_FIELD_BEHAVIOUR["relabeling"]
    placeholders = UI_FIELD_BEHAVIOUR["placeholders"]
    rows = [
        "| Form field | Stored in | Default | Type | Meaning |",
        "| --- | --- | --- | --- | --- |",
        f"| {relabel['host']} | `host` | `{DEFAULT_BASE_URL}` | URL | Where the API lives; a host name "
        "without a scheme gets `https://`. Point it at the emulator with `http://127.0.0.1:8765`. |",
        f"| {relabel['password']} | `password` | | secret | {placeholders['password']}, sent in the "
        "`X-API-Key` header and nowhere else. |",
    ]
    for field in CONNECTION_FIELDS:
        default = "" if field.default is None else f"`{field.default}`"
        kind = field.type if field.minimum is None else f"{field.type}, at least {field.minimum}"
        label, meaning = _cell(field.label), _cell(field.description)
        rows.append(f"| {label} | extra `{field.name}` | {default} | {kind} | {meaning} |")
    hidden = ", ".join(f"`{name}`" for name in UI_FIELD_BEHAVIOUR["hidden-fields"])
    return "\n".join(rows) + f"\n\nThe form hides the standard fields {hidden}.\n"


def connection_env_example() -> str:
    """``AIRFLOW_CONN_BLIP2_DEFAULT`` with every field at its default, as a shell block."""
    (connection_type,) = get_provider_info()["connection-types"]
    extra = {field.name: field.default for field in CONNECTION_FIELDS if field.default is not None}
    value = {
        "conn_type": connection_type["connection-type"],
        "host": DEFAULT_BASE_URL,
        "password": "<your API key>",
        "extra": extra,
    }
    text = json.dumps(value, indent=2)
    return f"```bash\nexport AIRFLOW_CONN_BLIP2_DEFAULT='{text}'\n```\n"


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files, **kwargs: Any) -> str:
    """Fill in the generated parts of a page."""
    if FIELDS_MARKER in markdown:
        markdown = markdown.replace(FIELDS_MARKER, connection_fields_table())
    if ENV_MARKER in markdown:
        markdown = markdown.replace(ENV_MARKER, connection_env_example())
    return markdown


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    """Add the benchmark plots, drawn from the committed results, to the site."""
    plots = render_all()
    if not plots:
        raise PluginError("no benchmark results under benchmarks/results/: run `make bench`")
    for name, content in plots.items():
        files.append(File.generated(config, f"{PLOTS_URI}/{name}", content=content))
    return files
