"""How a single prediction's image reaches the service: its URL, signed, or an uploaded copy."""

from __future__ import annotations

from typing import Any

from airflow_provider_blip2.client.uploads import TRANSFER_UPLOAD, transfer_for
from airflow_provider_blip2.operators.base import url_expiry
from airflow_provider_blip2.operators.uploads import single_upload
from airflow_provider_blip2.storage import is_remote_object


def single_image_url(op: Any, context: Any) -> str:
    """
    The URL the service downloads the operator's image from.

    An uploaded copy's public URL when ``image_transfer`` asks for an upload; a signed URL for an
    ``s3://`` or ``gs://`` object, after checking it exists; else the image's own URL.

    :param op: The :class:`~airflow_provider_blip2.operators.blip2.Blip2PredictionOperator`.
    :param context: The task context (its state store keeps an uploaded copy for a retry).
    """
    image = op.image
    if not isinstance(image, str):
        return image
    if transfer_for(op.image_transfer, image) == TRANSFER_UPLOAD:
        return single_upload(op, context).public_url
    if is_remote_object(image):
        op.storage.check_exists(image)
        return str(op.storage.signed_url(image, expires_in=url_expiry(op.url_expiry, op.timeout)))
    return image
