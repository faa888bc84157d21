"""
Unit tests of the operators' OpenLineage datasets: naming, and lineage with or without openlineage.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from airflow_provider_blip2.lineage import (
    batch_images,
    dataset_name,
    folder_name,
    operator_lineage,
    single_image,
)
from tests.lineage import OPENLINEAGE

SIGNED = "https://cdn.example.com:8443/u/7/cat.jpg?X-Amz-Signature=0c9e7a51&X-Amz-Credential=AKIA"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://uploads/2026-11-27/user-1/cat.jpg", ("s3://uploads", "2026-11-27/user-1/cat.jpg")),
        ("gs://catalogue/products/cup.png", ("gs://catalogue", "products/cup.png")),
        ("s3://uploads/", ("s3://uploads", "/")),
        ("s3://uploads", ("s3://uploads", "/")),
        (SIGNED, ("https://cdn.example.com:8443", "/u/7/cat.jpg")),
        ("https://user:hunter2@cdn.example.com/a.jpg#x", ("https://cdn.example.com", "/a.jpg")),
        ("https://cdn.example.com", ("https://cdn.example.com", "/")),
        ("/data/out/captions.jsonl", ("file", "/data/out/captions.jsonl")),
        ("file:///data/out/captions.jsonl", ("file", "/data/out/captions.jsonl")),
        ("out/captions.jsonl", ("file", os.path.abspath("out/captions.jsonl"))),
        ("file://elsewhere/x.jsonl", None),
        ("s3:///no-bucket.jpg", None),
        ("http://host:notaport/a.jpg?sig=1", None),
        ("ftp://host/a.jpg", None),
        ("", None),
    ],
)
def test_dataset_name(uri: str, expected: tuple[str, str] | None) -> None:
    assert dataset_name(uri) == expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://uploads/2026-11-27/cat.jpg", ("s3://uploads", "2026-11-27")),
        ("s3://uploads/2026-11-27/", ("s3://uploads", "2026-11-27")),
        ("s3://uploads/2026-11-27/img_", ("s3://uploads", "2026-11-27")),
        ("gs://catalogue/cup.png", ("gs://catalogue", "/")),
        ("gs://catalogue/", ("gs://catalogue", "/")),
        (SIGNED, ("https://cdn.example.com:8443", "/u/7")),
        ("https://cdn.example.com/cat.jpg", ("https://cdn.example.com", "/")),
    ],
)
def test_folder_name(uri: str, expected: tuple[str, str]) -> None:
    assert folder_name(uri) == expected


def test_a_single_image_is_its_object() -> None:
    assert single_image("s3://photos/cat.jpg") == [("s3://photos", "cat.jpg")]
    assert single_image(SIGNED) == [("https://cdn.example.com:8443", "/u/7/cat.jpg")]
    assert single_image(None) == []
    assert single_image("not a url") == [("file", os.path.abspath("not a url"))]


def test_a_batch_reads_folders_each_once() -> None:
    assert batch_images("s3://uploads/2026-11-27/") == [("s3://uploads", "2026-11-27")]
    images = [
        "s3://uploads/day/a.jpg",
        "s3://uploads/day/b.jpg",
        "s3://uploads/other/",
        "gs://catalogue/products/c.png",
        SIGNED,
        "https://cdn.example.com:8443/u/7/dog.jpg?sig=other",
        42,
    ]
    assert batch_images(images) == [
        ("s3://uploads", "day"),
        ("s3://uploads", "other"),
        ("gs://catalogue", "products"),
        ("https://cdn.example.com:8443", "/u/7"),
    ]
    assert batch_images(None) == []


def test_no_name_holds_a_query_string_or_credentials() -> None:
    names = [*single_image(SIGNED), *batch_images([SIGNED]), dataset_name(SIGNED)]
    text = repr(names)
    assert "Signature" not in text and "AKIA" not in text and "?" not in text


@pytest.mark.skipif(not OPENLINEAGE, reason="needs the openlineage provider")
def test_operator_lineage_with_openlineage() -> None:
    from airflow.providers.openlineage.extractors import OperatorLineage

    lineage = operator_lineage(
        inputs=[("s3://uploads", "day")],
        outputs=[("s3://reports", "day/answers.jsonl", 12), ("file", "/tmp/x", None)],
        prediction_id="p-1",
    )
    assert isinstance(lineage, OperatorLineage)
    [source] = lineage.inputs
    assert (source.namespace, source.name) == ("s3://uploads", "day")
    written, other = lineage.outputs
    assert (written.namespace, written.name) == ("s3://reports", "day/answers.jsonl")
    assert written.outputFacets["outputStatistics"].rowCount == 12
    assert other.outputFacets == {}
    external = lineage.run_facets["externalQuery"]
    assert (external.externalQueryId, external.source) == ("p-1", "eachlabs")
    bare = operator_lineage(inputs=[])
    assert bare is not None and bare.run_facets == {} and bare.inputs == bare.outputs == []


def test_operator_lineage_without_openlineage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the openlineage provider there is no lineage, and no error."""
    if OPENLINEAGE:  # hide the installed provider the way a missing one looks to an import
        monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", None)
    kwargs: dict[str, Any] = {
        "inputs": [("s3://b", "k")],
        "outputs": [("file", "/x", 1)],
        "prediction_id": "p",
    }
    assert operator_lineage(**kwargs) is None
