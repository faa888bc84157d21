"""Canned answers: a JSON file mapping images (and questions) to outputs or errors.

Format::

    {"answers": [
        {"image": "<sha256 hex or file name>", "question": "<question>", "output": "text"},
        {"image": "cat.png", "question": "caption", "output": "a cat"},
        {"image": "broken.png", "error": {"error_code": "PROVIDER_FAILED", "error_message": "..."}}
    ]}

``question`` omitted or ``"*"`` matches any question and captioning, ``"caption"`` matches captioning only.
The first matching entry wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_blip2.emulator.imaging import PredictionFailure
from airflow_provider_blip2.emulator.inputs import CAPTION_LABEL, ModelInput

ANY_QUESTION = "*"


@dataclass(frozen=True)
class Answer:
    """One entry of an answers file.

    :param image: sha256 hex digest of the image bytes, or the URL basename.
    :param question: the question to match, ``"*"`` for any, ``"caption"`` for captioning.
    :param output: the output on success, or None for the error form.
    :param error: the error envelope fields for the error form, or None.
    """

    image: str
    question: str = ANY_QUESTION
    output: str | None = None
    error: dict[str, Any] | None = None

    def matches(self, sha256: str, image_name: str, model_input: ModelInput) -> bool:
        """Tell whether this entry applies to a prediction.

        :param sha256: hex digest of the downloaded image bytes.
        :param image_name: basename of the image URL.
        :param model_input: the validated input.
        """
        if self.image.lower() != sha256 and self.image != image_name:
            return False
        if self.question == ANY_QUESTION:
            return True
        if self.question.lower() == CAPTION_LABEL:
            return model_input.is_captioning
        return not model_input.is_captioning and (
            self.question.strip().casefold() == model_input.question.strip().casefold()
        )

    def failure(self) -> PredictionFailure:
        """Return the failure of the error form.

        :raises ValueError: when this entry has no error.
        """
        if self.error is None:
            raise ValueError("this answer has no error")
        message = str(self.error.get("error_message") or self.error.get("error") or "prediction failed")
        classification = self.error.get("classification")
        category = "provider"
        if isinstance(classification, dict) and classification.get("category"):
            category = str(classification["category"])
        return PredictionFailure(
            error_code=str(self.error.get("error_code", "PROVIDER_FAILED")),
            error=str(self.error.get("error") or message),
            error_message=message,
            category=category,
            retryable=bool(self.error.get("retryable", False)),
        )


def load_answers(path: str | Path | None) -> tuple[Answer, ...]:
    """Read and validate an answers file.

    :param path: the file, or None for no canned answers.
    :raises ValueError: when the file is not a valid answers file.
    """
    if path is None:
        return ()
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    entries = document.get("answers") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object with an 'answers' list")
    return tuple(_parse_entry(path, index, entry) for index, entry in enumerate(entries))


def _parse_entry(path: str | Path, index: int, entry: Any) -> Answer:
    where = f"{path}: answers[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
        raise ValueError(f"{where}: needs a non-empty string 'image'")
    question = entry.get("question")
    if question is None:
        question = ANY_QUESTION
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'question' must be a string")
    output, error = entry.get("output"), entry.get("error")
    if (output is None) == (error is None):
        raise ValueError(f"{where}: needs exactly one of 'output' or 'error'")
    if output is not None and not isinstance(output, str):
        raise ValueError(f"{where}: 'output' must be a string")
    if error is not None and not isinstance(error, dict):
        raise ValueError(f"{where}: 'error' must be an object")
    return Answer(image=entry["image"], question=question, output=output, error=error)


def find_answer(
    answers: tuple[Answer, ...], sha256: str, image_name: str, model_input: ModelInput
) -> Answer | None:
    """Return the first answer matching a prediction, or None.

    :param answers: the loaded answers.
    :param sha256: hex digest of the downloaded image bytes.
    :param image_name: basename of the image URL.
    :param model_input: the validated input.
    """
    for answer in answers:
        if answer.matches(sha256, image_name, model_input):
            return answer
    return None
