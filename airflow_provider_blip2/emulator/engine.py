"""The emulated model service: creating, running and cancelling predictions, and fault decisions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from airflow_provider_blip2.emulator.answers import find_answer, load_answers
from airflow_provider_blip2.emulator.config import EmulatorConfig
from airflow_provider_blip2.emulator.imaging import (
    PredictionFailure,
    download_image,
    emulated_output,
    inspect_image,
    unreachable,
)
from airflow_provider_blip2.emulator.inputs import ModelInput
from airflow_provider_blip2.emulator.state import (
    STATUS_CANCELLED,
    STATUS_ERROR,
    STATUS_PROCESSING,
    STATUS_SUCCESS,
    Ledger,
    Prediction,
    RateLimiter,
)
from airflow_provider_blip2.emulator.uploads import UploadStore

logger = logging.getLogger(__name__)

CREATED_PHASE = 0.1
"""Fraction of the latency a prediction stays ``created`` before it turns ``processing``."""
FAULT_5XX_CODES = (500, 502, 503)


@dataclass(frozen=True)
class FaultDecision:
    """The faults injected into one request.

    :param slow: delay the request by the slow delay first.
    :param kind: ``"5xx"``, ``"429"``, ``"drop"`` or None.
    :param status_code: the status of a 5xx fault.
    :param empty_body: answer a 5xx fault with ``{}`` rather than an error object.
    """

    slow: bool = False
    kind: str | None = None
    status_code: int = 500
    empty_body: bool = False


def input_key(model_input: ModelInput) -> str:
    """How the ledger's ``creates_by_input`` names an input: ``<image file name>|<label>``."""
    return f"{model_input.image_name}|{model_input.label}"


class Emulator:
    """The state and behaviour of one emulated API, independent of HTTP.

    All methods but the constructor run on the event loop of the app.

    :param config: the settings, read at request time.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.answers = load_answers(config.answers_file)
        self.predictions: dict[str, Prediction] = {}
        self.ledger = Ledger()
        self.limiter = RateLimiter()
        self._rng = random.Random(config.seed)
        self._downloads: httpx.AsyncHTTPTransport | None = None
        self.uploads = UploadStore(config.time_scale)

    # ---- faults -------------------------------------------------------------------------------------

    def draw_faults(self) -> FaultDecision:
        """Draw the faults of one request from the seeded generator.

        Every call consumes the same number of draws, so a seed gives the same faults for the same
        sequence of requests whatever the probabilities.
        """
        config = self.config
        slow, fail, throttle, drop = (self._rng.random() for _ in range(4))
        status_code = self._rng.choice(FAULT_5XX_CODES)
        empty_body = self._rng.random() < 0.5
        kind: str | None = None
        if fail < config.fault_5xx:
            kind = "5xx"
        elif throttle < config.fault_429:
            kind = "429"
        elif drop < config.fault_drop:
            kind = "drop"
        return FaultDecision(slow < config.fault_slow, kind, status_code, empty_body)

    def draw_prediction_faults(self, model_input: ModelInput) -> tuple[bool, bool]:
        """Draw the faults of a prediction about to be created: ``(provider_fails, answer_5xx)``.

        The draws depend on the seed, the input (image file name and question, as the ledger's
        ``creates_by_input`` names it) and how many predictions of that input were created before,
        not on the order of the requests: the same items get the same faults however a client
        interleaves its creates, and the request faults keep their sequence.

        :param model_input: the validated input.
        """
        draws = self._draws_for(model_input)
        provider, created_5xx = draws.random(), draws.random()
        return provider < self.config.fault_provider_failed, created_5xx < self.config.fault_created_5xx

    def _latency(self, model_input: ModelInput) -> float:
        """The latency of a prediction about to be created, drawn like its faults (seed and input).

        :param model_input: the validated input.
        """
        return self.config.latency_of(self._draws_for(model_input, "latency/").random())

    def _draws_for(self, model_input: ModelInput, purpose: str = "") -> random.Random:
        """
        The random draws of the next prediction of an input: from the seed, the purpose, the input
        and how many predictions of it were created before.

        :param model_input: the validated input.
        :param purpose: told apart from the faults' draws (``""``), e.g. ``"latency/"``.
        """
        key = input_key(model_input)
        return random.Random(f"{self.config.seed}/{purpose}{key}/{self.ledger.creates_by_input[key]}")

    # ---- predictions --------------------------------------------------------------------------------

    def in_flight(self, api_key: str | None = None) -> int:
        """Count predictions not yet terminal.

        :param api_key: count only this key's predictions; None counts all.
        """
        return sum(
            1
            for prediction in self.predictions.values()
            if not prediction.terminal and (api_key is None or prediction.api_key == api_key)
        )

    def next_slot_in(self, api_key: str) -> float:
        """Estimate seconds until one of a key's in-flight predictions ends.

        :param api_key: the key.
        """
        now = time.monotonic()
        remaining = [
            prediction.created_at + prediction.latency - now
            for prediction in self.predictions.values()
            if not prediction.terminal and prediction.api_key == api_key
        ]
        return max(min(remaining, default=0.0), self.config.scaled(0.1))

    def get(self, prediction_id: str, api_key: str) -> Prediction | None:
        """Return a prediction of a key, or None when it does not exist for that key.

        :param prediction_id: the id.
        :param api_key: the key asking.
        """
        prediction = self.predictions.get(prediction_id)
        if prediction is None or prediction.api_key != api_key:
            return None
        return prediction

    def create(
        self,
        api_key: str,
        raw_input: dict[str, Any],
        model_input: ModelInput,
        *,
        provider_fails: bool = False,
    ) -> Prediction:
        """Create a prediction and start processing it in the background.

        :param api_key: the key creating it.
        :param raw_input: the input as the client sent it.
        :param model_input: the validated input.
        :param provider_fails: end it with a retryable ``PROVIDER_FAILED`` error once its image was read.
        """
        prediction = Prediction(
            id=str(uuid.uuid4()),
            api_key=api_key,
            input=raw_input,
            model_input=model_input,
            created_at=time.monotonic(),
            latency=self._latency(model_input),
            provider_fails=provider_fails,
        )
        prediction.log(f"prediction created for image '{model_input.image_name}'")
        self.predictions[prediction.id] = prediction
        self.ledger.creates += 1
        self.ledger.creates_by_input[input_key(model_input)] += 1
        self.ledger.peak_in_flight = max(self.ledger.peak_in_flight, self.in_flight())
        prediction.task = asyncio.get_running_loop().create_task(self._run(prediction))
        return prediction

    async def wait_ended(self, prediction: Prediction, timeout: float) -> bool:
        """Wait until a prediction has ended (finished, cancelled, or stopped by a reset).

        The prediction itself is never cancelled by the wait, whatever happens to the waiter.

        :param prediction: the prediction.
        :param timeout: seconds to wait at most (already scaled).
        :return: whether the prediction is terminal.
        """
        waiter = asyncio.ensure_future(prediction.ended.wait())
        watched: set[asyncio.Future[Any]] = {waiter}
        if prediction.task is not None:
            watched.add(prediction.task)
        try:
            await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        return prediction.terminal

    def cancel(self, prediction: Prediction) -> bool:
        """Cancel a running prediction.

        :param prediction: the prediction.
        :return: True when it was running and is now cancelled, False when it was already terminal.
        """
        if prediction.terminal:
            return False
        prediction.log("prediction cancelled by request")
        prediction.finish(STATUS_CANCELLED, time.monotonic())
        self.ledger.statuses[STATUS_CANCELLED] += 1
        if prediction.task is not None:
            prediction.task.cancel()
        return True

    async def _run(self, prediction: Prediction) -> None:
        deadline = prediction.created_at + prediction.latency
        await asyncio.sleep(prediction.latency * CREATED_PHASE)
        prediction.status = STATUS_PROCESSING
        prediction.started_at = time.monotonic()
        outcome: str | PredictionFailure
        try:
            outcome = await self._predict(prediction)
        except PredictionFailure as failure:
            outcome = failure
        except Exception as exc:  # a bug in the emulator must still end the prediction
            logger.exception("emulator failed to process prediction %s", prediction.id)
            outcome = PredictionFailure(
                "PROVIDER_FAILED", "internal emulator error", type(exc).__name__, "provider", True
            )
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        self._finish(prediction, outcome)

    async def _predict(self, prediction: Prediction) -> str:
        model_input = prediction.model_input
        name = model_input.image_name
        prediction.log(f"downloading image '{name}'")
        data = self.uploads.copy_of(model_input.image)
        if data is None and self.config.fetch_only_uploads:
            raise unreachable(name)
        if data is None:
            data = await download_image(
                self._transport(),
                model_input.image,
                self.config.max_image_bytes,
                self.config.download_timeout,
            )
        prediction.log(f"downloaded {len(data)} bytes")
        facts = await asyncio.to_thread(inspect_image, data, name)
        prediction.log(f"decoded {facts.format} image {facts.size}, sha256 {facts.sha256[:12]}")
        if prediction.provider_fails:
            self.ledger.provider_failed_injected += 1
            raise PredictionFailure(
                "PROVIDER_FAILED",
                "provider failed",
                "the model provider failed while running the prediction (injected fault)",
                category="provider",
                retryable=True,
            )
        prompt = model_input.prompt
        prediction.log("mode: caption" if prompt is None else f"prompt: {prompt}")
        answer = find_answer(self.answers, facts.sha256, name, model_input)
        if answer is not None:
            prediction.log("answer taken from the answers file")
            if answer.output is None:
                raise answer.failure()
            return answer.output
        return emulated_output(facts, model_input)

    def _finish(self, prediction: Prediction, outcome: str | PredictionFailure) -> None:
        if prediction.terminal:
            return
        now = time.monotonic()
        if isinstance(outcome, PredictionFailure):
            prediction.log(f"error {outcome.error_code}: {outcome.error_message}")
            prediction.finish(STATUS_ERROR, now, outcome.envelope())
        else:
            prediction.log("prediction succeeded")
            prediction.finish(STATUS_SUCCESS, now, outcome, self.config.cost_per_prediction)
        self.ledger.statuses[prediction.status] += 1

    def _transport(self) -> httpx.AsyncBaseTransport:
        if self._downloads is None:
            self._downloads = httpx.AsyncHTTPTransport(retries=0)
        return self._downloads

    # ---- lifecycle ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return the ledger as the JSON of ``GET /_emulator/ledger``."""
        return {**self.ledger.snapshot(self.in_flight()), "uploads": self.uploads.snapshot()}

    def reset(self) -> None:
        """Forget every prediction, counter and rate window, and re-seed the fault generator."""
        for prediction in self.predictions.values():
            if prediction.task is not None:
                prediction.task.cancel()
        self.predictions.clear()
        self.ledger = Ledger()
        self.uploads = UploadStore(self.config.time_scale)
        self.limiter.clear()
        self._rng = random.Random(self.config.seed)

    async def aclose(self) -> None:
        """Stop every running prediction (it ends with a retryable error) and close the downloads."""
        tasks = [p.task for p in self.predictions.values() if p.task is not None and not p.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stopped = PredictionFailure(
            "PROVIDER_FAILED",
            "emulator stopped",
            "the emulator stopped before the prediction finished",
            category="provider",
            retryable=True,
        )
        for prediction in self.predictions.values():
            self._finish(prediction, stopped)
        if self._downloads is not None:
            await self._downloads.aclose()
            self._downloads = None
