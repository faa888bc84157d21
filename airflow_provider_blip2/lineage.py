"""
OpenLineage datasets of the operators: where their images come from, where a batch writes to.

Names follow OpenLineage's naming conventions: ``s3://bucket`` or ``gs://bucket`` and the object
key, ``file`` and the absolute path of a local file, and for web URLs their origin
(``https://host[:port]``) and path. A name never holds a query string (a presigned URL's
signature) or credentials. The openlineage provider is imported only by :func:`operator_lineage`,
when the lineage is asked for: importing this module or the operators never imports it, and
without it the operators report no lineage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_blip2.client.inputs import split_public_url
from airflow_provider_blip2.storage.uris import (
    HTTP_SCHEMES,
    LOCAL_SCHEMES,
    REMOTE_SCHEMES,
    local_path,
    split_uri,
    uri_scheme,
)

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

#: The ``source`` of the run's ``externalQuery`` facet, whose id is the prediction's.
EXTERNAL_QUERY_SOURCE = "eachlabs"

#: A dataset: ``(namespace, name)``.
DatasetName = tuple[str, str]


def dataset_name(uri: str) -> DatasetName | None:
    """
    Name an object, a file or a web URL the OpenLineage way.

    :param uri: ``s3://bucket/key``, ``gs://bucket/object``, an http(s) URL, or a local path or
        ``file://`` URI.
    :return: ``("s3://bucket", "key")``, ``("gs://bucket", "object")``,
        ``("https://host[:port]", "/path")`` or ``("file", "/absolute/path")``; ``/`` names the top;
        ``None`` for anything else.
    """
    scheme = uri_scheme(uri)
    try:
        if scheme in REMOTE_SCHEMES:
            scheme, bucket, key = split_uri(uri)
            return f"{scheme}://{bucket}", key or "/"
        if scheme in HTTP_SCHEMES:
            public = split_public_url(uri)
            return None if public is None else (public[0], public[1] or "/")
        if scheme in LOCAL_SCHEMES and uri:
            return "file", os.path.abspath(local_path(uri))
    except ValueError:
        return None
    return None


def folder_name(uri: str) -> DatasetName | None:
    """
    Name the folder an image is in, or the folder a prefix lists.

    The folder is the name up to its last ``/``: ``s3://b/day/a.jpg``, ``s3://b/day/`` and
    ``s3://b/day/img_`` all give ``("s3://b", "day")``; ``/`` names the top.

    :param uri: As for :func:`dataset_name`.
    """
    named = dataset_name(uri)
    if named is None:
        return None
    namespace, name = named
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    return namespace, folder or "/"


def single_image(image: Any) -> list[DatasetName]:
    """
    The input of a single prediction: its image.

    :param image: The operator's (rendered) ``image``.
    """
    named = dataset_name(image) if isinstance(image, str) else None
    return [] if named is None else [named]


def batch_images(images: Any) -> list[DatasetName]:
    """
    The inputs of a batch: the folders its images are in, or the prefix it lists, each once.

    A batch may hold thousands of images: it reads folders, not one dataset per image.

    :param images: The operator's (rendered) ``images``: a prefix or a list of URIs and prefixes.
    """
    entries = [images] if isinstance(images, str) else images if isinstance(images, Sequence) else []
    names: dict[DatasetName, None] = {}
    for entry in entries:
        named = folder_name(entry) if isinstance(entry, str) else None
        if named is not None:
            names.setdefault(named, None)
    return list(names)


def operator_lineage(
    *,
    inputs: Iterable[DatasetName],
    outputs: Iterable[tuple[str, str, int | None]] = (),
    prediction_id: str | None = None,
) -> OperatorLineage | None:
    """
    Build the lineage OpenLineage reads from ``get_openlineage_facets_on_complete``.

    :param inputs: The datasets read, as ``(namespace, name)``.
    :param outputs: The datasets written, as ``(namespace, name, rows written or None)``; the rows
        go into the ``outputStatistics`` facet.
    :param prediction_id: The prediction the run made, as the run's ``externalQuery`` facet.
    :return: The lineage, or ``None`` when the openlineage provider is not installed.
    """
    try:
        from airflow.providers.common.compat.openlineage.facet import (
            ExternalQueryRunFacet,
            InputDataset,
            OutputDataset,
            OutputStatisticsOutputDatasetFacet,
        )
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    output_datasets = []
    for namespace, name, rows in outputs:
        statistics: dict[str, Any] = {}
        if rows is not None:
            statistics["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=rows)
        output_datasets.append(OutputDataset(namespace=namespace, name=name, outputFacets=statistics))
    run_facets: dict[str, Any] = {}
    if prediction_id:
        run_facets["externalQuery"] = ExternalQueryRunFacet(
            externalQueryId=prediction_id, source=EXTERNAL_QUERY_SOURCE
        )
    return OperatorLineage(
        inputs=[InputDataset(namespace=namespace, name=name) for namespace, name in inputs],
        outputs=output_datasets,
        run_facets=run_facets,
    )
