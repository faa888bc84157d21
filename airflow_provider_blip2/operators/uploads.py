"""
The operators' uploads of images that no URL reaches (their ``image_transfer``).

:class:`ImageUploader` stages an image on the worker
(:func:`~airflow_provider_blip2.storage.staging.stage_image`), uploads it through the hook and
gives back an :class:`UploadedImage`: the copy's public URL and when it expires. Operators keep
that in their durable state, sealed with the API key
(:mod:`~airflow_provider_blip2.client.sealing`), so that a retried task or a resumed batch reuses a
copy still kept long enough for a prediction, and uploads again only when it may be gone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_blip2.batch import image_key
from airflow_provider_blip2.client.sealing import seal, unseal
from airflow_provider_blip2.client.uploads import Blip2UploadError, retention_seconds
from airflow_provider_blip2.storage.errors import StorageError
from airflow_provider_blip2.storage.masking import mask_signed_url
from airflow_provider_blip2.storage.staging import stage_image

if TYPE_CHECKING:
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook
    from airflow_provider_blip2.storage import ObjectStorage

#: Uploads a batch runs at once (each reads a file and PUTs it to object storage).
UPLOAD_CONCURRENCY = 4
#: Seconds of a copy's retention that must be left beyond a prediction's timeout to reuse it.
REUSE_MARGIN = 60.0
#: The task state store's key of a single prediction's uploaded copy (a retry reuses it while kept).
UPLOAD_STATE_KEY = "blip2_upload"


@dataclass(frozen=True)
class UploadedImage:
    """
    An image's uploaded copy.

    :param public_url: Where the service reads it (anyone who has it may, while it is kept).
    :param expires_at: Unix time its retention ends.
    """

    public_url: str = field(repr=False)
    expires_at: float

    def usable_for(self, timeout: float, *, now: float | None = None) -> bool:
        """Whether a prediction of at most ``timeout`` seconds started now can still read it."""
        return self.expires_at > (time.time() if now is None else now) + timeout + REUSE_MARGIN

    def to_json(self, api_key: str) -> list[Any]:
        """The copy as durable state keeps it: the URL sealed with the API key, and its expiry."""
        return [seal(self.public_url, api_key, always=True), self.expires_at]

    @classmethod
    def from_json(cls, value: Any, api_key: str) -> UploadedImage | None:
        """Inverse of :meth:`to_json`; ``None`` for anything else (or a seal of another key)."""
        try:
            return cls(unseal(str(value[0]), api_key), float(value[1]))
        except (TypeError, ValueError, IndexError, KeyError):
            return None


class ImageUploader:
    """
    Uploads an operator's images through its hook.

    :param hook: The operator's hook.
    :param storage: Reads ``s3://`` and ``gs://`` images.
    :param timeout: The prediction timeout (the retention is based on it).
    :param retention: The operator's ``upload_retention``, or ``None``.
    """

    def __init__(
        self, hook: Blip2Hook, storage: ObjectStorage, *, timeout: float, retention: float | None
    ) -> None:
        self.hook = hook
        self.storage = storage
        self.timeout = timeout
        self.retention = retention_seconds(timeout, retention)

    def upload(self, uri: str, *, field_name: str = "image") -> UploadedImage:
        """
        Stage one image and upload it.

        :param uri: The image as given.
        :param field_name: The operator's field, for messages.
        """
        staged = stage_image(uri, self.storage.read_bytes, field_name=field_name)
        try:
            upload = self.hook.upload_file(
                staged.path, content_type=staged.content_type, size=staged.size, retention=self.retention
            )
        finally:
            staged.discard()
        return UploadedImage(upload.public_url, upload.expires_at)

    def upload_many(self, uris: Mapping[int, str]) -> dict[int, UploadedImage | Exception]:
        """
        Upload several images, :data:`UPLOAD_CONCURRENCY` at once; an image that fails gives its error.

        :param uris: Item index -> image.
        """

        def one(uri: str) -> UploadedImage | Exception:
            try:
                return self.upload(uri, field_name="images")
            except (StorageError, Blip2UploadError) as error:
                return error

        with ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY, thread_name_prefix="blip2-upload") as pool:
            results = dict(zip(uris, pool.map(one, uris.values()), strict=True))
        return results


def single_upload(op: Any, context: Any) -> UploadedImage:
    """
    The single operator's uploaded copy: the one an earlier try made while it is kept, else a new one.

    :param op: The prediction operator.
    :param context: The task context (its task state store keeps the copy, sealed), or ``None``.
    """
    store: Any = context.get("task_state_store") if context else None
    api_key = op.hook.settings.api_key
    kept = store.get(UPLOAD_STATE_KEY) if store is not None else None
    if isinstance(kept, dict) and kept.get("image") == image_key(op.image):
        copy = UploadedImage.from_json(kept.get("copy"), api_key)
        if copy is not None and copy.usable_for(op.timeout):
            mask_signed_url(copy.public_url)
            op.log.info(
                "Reusing the uploaded copy of an earlier try (kept %.0f s more)",
                copy.expires_at - time.time(),
            )
            return copy
    copy = ImageUploader(op.hook, op.storage, timeout=op.timeout, retention=op.upload_retention).upload(
        op.image
    )
    if store is not None:
        store.set(UPLOAD_STATE_KEY, {"image": image_key(op.image), "copy": copy.to_json(api_key)})
    return copy


def needs_upload(op: Any, image: str) -> bool:
    """
    Whether a batch's image goes through the upload endpoint (by the operator's ``image_transfer``).

    :param op: The batch operator.
    :param image: The image's key in the journal.
    """
    from airflow_provider_blip2.client.uploads import TRANSFER_UPLOAD, transfer_for

    return transfer_for(op.image_transfer, op._image_url(image), field_name="images") == TRANSFER_UPLOAD


def batch_uploads(
    op: Any, journal: Any, state: Any, indexes: list[int]
) -> dict[int, UploadedImage | Exception]:
    """
    The uploaded copies a batch's items are predicted with (for items whose image is uploaded).

    Each image is uploaded once (an image asked several questions shares its copy),
    :data:`UPLOAD_CONCURRENCY` at once, and its copy recorded in the journal; a copy an earlier
    cycle or try recorded is reused while a prediction can still read it. An image that could not
    be read or uploaded gives its error, for its items to record.

    :param op: The batch operator.
    :param journal: The batch's journal.
    :param state: The batch's progress.
    :param indexes: Items about to be predicted whose image is uploaded (:func:`needs_upload`).
    """
    api_key = op.hook.settings.api_key
    copies: dict[str, UploadedImage | Exception] = {}
    for index in indexes:
        key = state.items[index].image
        kept = UploadedImage.from_json(state.uploads[key], api_key) if key in state.uploads else None
        if kept is not None and kept.usable_for(op.timeout):
            mask_signed_url(kept.public_url)
            copies[key] = kept
    missing = {state.items[i].image: op._image_url(state.items[i].image) for i in indexes}
    missing = {key: uri for key, uri in missing.items() if key not in copies}
    if missing:
        uploader = ImageUploader(op.hook, op.storage, timeout=op.timeout, retention=op.upload_retention)
        results = uploader.upload_many(dict(enumerate(missing.values())))
        for key, result in zip(missing, results.values(), strict=True):
            copies[key] = result
            if isinstance(result, UploadedImage):
                journal.record_upload(state, key, result.to_json(api_key))
    return {index: copies[state.items[index].image] for index in indexes}
