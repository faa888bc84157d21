"""The operator extra link of a BLIP-2 prediction: a button on the task instance that opens it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey

#: The XCom key of the link, pushed by the operator as soon as the prediction exists (before it
#: waits or defers), so the link shows while the task is deferred and survives the resume.
PREDICTION_URL_XCOM_KEY = "prediction_url"


class Blip2PredictionLink(BaseOperatorLink):
    """
    Open the prediction of a task instance: its Eachlabs console page, or the API's ``urls.get``.

    The operator pushes the URL to XCom (key ``prediction_url``) right after the prediction is
    created or a retry reattaches to it; this link reads it back for the task instance it is asked
    about (each map index of a mapped task has its own). The URL never holds a key, credentials or
    a query string. The API's ``urls.get`` answers JSON to requests that carry the API key.
    """

    name = "BLIP-2 prediction"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the URL of the prediction of ``ti_key``, or ``""`` while it has none.

        :param operator: The operator (unused: the URL is in the task instance's XCom).
        :param ti_key: The task instance: dag, task, run and map index.
        """
        from airflow.providers.common.compat.sdk import XCom

        url = XCom.get_value(key=PREDICTION_URL_XCOM_KEY, ti_key=ti_key)
        return url if isinstance(url, str) else ""
