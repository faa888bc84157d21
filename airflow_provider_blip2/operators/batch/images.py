"""
The batch operator's images: the list or prefix it is given, resolved to items, and each one's URL.

Everything here runs on the worker before (or while) predictions are created: listing a prefix or
a local directory, checking that every object and file exists (and that a file is an image), and
turning an item's image into the URL the service gets (its uploaded copy, a signed URL, or the URL
as given).
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_blip2.batch import BatchItem, build_items, image_key
from airflow_provider_blip2.client.errors import Blip2InputError
from airflow_provider_blip2.client.uploads import check_image_file, local_path, transfer_for
from airflow_provider_blip2.storage import StorageError, is_remote_object

if TYPE_CHECKING:
    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator
    from airflow_provider_blip2.operators.uploads import UploadedImage

#: An image URL that stands for any while the questions are checked, before any request.
CHECK_URL = "https://images.invalid/check.jpg"


def resolve_items(op: Blip2BatchPredictionOperator) -> list[BatchItem]:
    """
    Resolve the operator's ``images`` to the batch's items, failing before any create on bad input.

    :param op: The batch operator.
    """
    try:
        op.storage.check_writable(op.output_uri)
        uris: list[str] = []
        for entry in image_list(op.images, op.image_transfer):
            if is_prefix(entry, listing_one=isinstance(op.images, str)):
                listed = list_prefix(op, entry)
                op.log.info("Found %d images under %s", len(listed), entry)
                uris += listed
            else:
                uris.append(entry)
        uris = list(dict.fromkeys(uris))
        if not op.cache_uri:  # with a cache, reading the fingerprints checks them
            op.storage.check_all_exist([uri for uri in uris if is_remote_object(uri)])
        for uri in uris:
            if (path := local_path(uri)) is not None:
                check_image_file(path, field_name="images")
        keys = [image_key(uri) for uri in uris]
        items = build_items(keys, questions=op.questions, question=op.question, caption=op.caption)
        for item in {(item.question,): item for item in items}.values():
            op._prediction_input(item, CHECK_URL)
    except (StorageError, Blip2InputError, ValueError) as error:
        raise AirflowFailException(f"Invalid batch for task {op.task_id}: {error}") from error
    if not items:
        op.log.warning("No images to predict: %s matched nothing", op.images)
    return items


def image_list(images: Any, image_transfer: str = "auto") -> list[str]:
    """
    Validate a list of image URIs (or one URL or path), keeping the first of duplicates.

    :param images: The operator's rendered ``images``.
    :param image_transfer: The operator's ``image_transfer``, checked against each image.
    """
    values = [images] if isinstance(images, str) else list(images or [])
    uris: dict[str, None] = {}
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"images: {value!r} is not an image URI or path")
        if "://" in value and not value.startswith(("https://", "http://", "s3://", "gs://", "file://")):
            raise ValueError(
                f"images: {value!r} is not an https://, http://, s3://, gs:// or file:// URI, or a path"
            )
        transfer_for(image_transfer, value, field_name="images")
        uris.setdefault(value, None)
    return list(uris)


def is_prefix(entry: str, *, listing_one: bool) -> bool:
    """Whether an entry of ``images`` is a folder to list: a bucket prefix, or a local directory."""
    path = local_path(entry)
    if path is not None:
        return path.is_dir()
    return is_remote_object(entry) and (listing_one or entry.endswith("/"))


def list_prefix(op: Blip2BatchPredictionOperator, entry: str) -> list[str]:
    """The images under a prefix or in a local directory (recursively), matching ``image_patterns``."""
    path = local_path(entry)
    if path is None:
        return op.storage.list_images(entry, op.image_patterns)
    patterns = [pattern.lower() for pattern in op.image_patterns]
    files = (p for p in sorted(path.rglob("*")) if p.is_file())
    return [str(p) for p in files if any(fnmatch.fnmatch(p.name.lower(), pattern) for pattern in patterns)]


def uploaded_or_signed(
    op: Blip2BatchPredictionOperator, upload: UploadedImage | Exception | None, image: str, expires_in: float
) -> str:
    """An item's image URL: its uploaded copy's (raising the upload's error), else signed or as given."""
    if isinstance(upload, Exception):
        raise upload
    if upload is not None:
        return upload.public_url
    return op.storage.signed_url(op._image_url(image), expires_in=expires_in)


def file_name(image: str) -> str:
    """How log lines name an image: its file name (a URL's query is redacted in journal keys)."""
    return image.rstrip("/").rsplit("/", 1)[-1]
