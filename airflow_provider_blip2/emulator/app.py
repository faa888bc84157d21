"""The FastAPI app of the emulator: the HTTP surface of the Eachlabs prediction API for blip-2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from airflow_provider_blip2.emulator.config import INJECTED_RETRY_AFTER_SECONDS, EmulatorConfig
from airflow_provider_blip2.emulator.engine import Emulator, FaultDecision
from airflow_provider_blip2.emulator.inputs import MODEL_SLUG, InputError, model_record, parse_input
from airflow_provider_blip2.emulator.state import STATUS_PROCESSING, STATUS_SUCCESS, Prediction
from airflow_provider_blip2.emulator.uploads import add_upload_routes

CONTEXT_SCOPE_KEY = "blip2_emulator.context"
REQUEST_ID_HEADER = b"x-request-id"
_DROP_WAIT_STEPS = 1000


class ApiError(Exception):
    """An HTTP error answer.

    :param status_code: the HTTP status.
    :param body: the JSON body.
    :param headers: extra response headers.
    """

    def __init__(self, status_code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status_code}: {body}")
        self.status_code = status_code
        self.body = body
        self.headers = headers or {}


class InjectedDrop(Exception):
    """Raised to make an ASGI server abort a connection for the drop fault (fallback only)."""


@dataclass
class RequestContext:
    """Per-request data shared between the handlers and the outer ASGI layer.

    :param request_id: the value of the ``X-Request-Id`` response header.
    :param drop: drop the connection instead of sending the response.
    """

    request_id: str
    drop: bool = False


@dataclass(frozen=True)
class Admission:
    """An authenticated, rate-limited request that may proceed.

    :param api_key: the caller's key.
    :param drop: a drop fault was injected: the response must never reach the client.
    """

    api_key: str
    drop: bool = False


class EmulatorApp(FastAPI):
    """The FastAPI app, with an outer ASGI layer that adds ``X-Request-Id``, counts responses and drops
    connections for the drop fault.

    :param emulator: the emulated service behind the routes.
    :param kwargs: passed to :class:`fastapi.FastAPI`.
    """

    def __init__(self, emulator: Emulator, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.emulator = emulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope.

        :param scope: the ASGI scope.
        :param receive: the ASGI receive callable.
        :param send: the ASGI send callable of the server.
        """
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        context = RequestContext(request_id=str(uuid.uuid4()))
        scope[CONTEXT_SCOPE_KEY] = context

        async def send_with_request_id(message: Message) -> None:
            if context.drop:
                return
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER, context.request_id.encode())]
                message = {**message, "headers": headers}
                self.emulator.ledger.count_response(int(message["status"]))
            await send(message)

        await super().__call__(scope, receive, send_with_request_id)
        if context.drop:
            await drop_connection(send)


async def drop_connection(send: Send) -> None:
    """Close the client connection without a response.

    Under uvicorn the server's ``send`` is a method of the request cycle, whose transport is closed
    directly: the client sees the connection end before any byte of a response. Elsewhere (another
    server, or uvicorn at log level ``trace``, which wraps ``send``), a response is started with a
    ``content-length`` that no body fills and the app fails, so the server aborts the connection
    mid-response and logs the :class:`InjectedDrop` error.

    :param send: the ASGI send callable of the server (not a wrapper of it).
    :raises InjectedDrop: in the fallback case.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and callable(getattr(transport, "close", None)):
        transport.close()
        for _ in range(_DROP_WAIT_STEPS):  # let the server see the connection is gone
            if getattr(cycle, "disconnected", True):
                break
            await asyncio.sleep(0.001)
        return
    start: Message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
    }
    await send(start)
    raise InjectedDrop("connection dropped by the emulator's drop fault")


# How the older docs and SDKs spell the statuses (the current ones: success, error, cancelled).
LEGACY_STATUSES = {"success": "completed", "error": "failed", "cancelled": "canceled"}


def format_retry_after(seconds: float, time_scale: float) -> tuple[str, int | float]:
    """Render a Retry-After value: whole seconds (rounded up) at ``time_scale >= 1``, else a decimal.

    :param seconds: seconds to wait.
    :param time_scale: the emulator's time scale.
    :return: the header text and the number for the body's ``retry_after``.
    """
    if time_scale >= 1:
        whole = max(1, math.ceil(round(seconds, 6)))
        return str(whole), whole
    hundredths = max(1, math.ceil(round(seconds * 100, 6)))
    return f"{hundredths / 100:.2f}", hundredths / 100


def too_many_requests(seconds: float, config: EmulatorConfig, message: str = "too many requests") -> ApiError:
    """Build a 429 answer carrying ``Retry-After`` and/or ``retry_after`` (``config.retry_after_in``).

    :param seconds: seconds until the client may retry.
    :param config: the emulator config.
    :param message: the error text.
    """
    header, number = format_retry_after(seconds, config.time_scale)
    place = "body" if config.legacy else config.retry_after_in
    body: dict[str, Any] = {"error": message}
    if place != "header":
        body["retry_after"] = number
    headers = {} if place == "body" else {"Retry-After": header}
    return ApiError(429, body, headers)


def _emulator(request: Request) -> Emulator:
    app = request.app
    assert isinstance(app, EmulatorApp)
    return app.emulator


def _context(request: Request) -> RequestContext:
    context = request.scope.get(CONTEXT_SCOPE_KEY)
    if not isinstance(context, RequestContext):
        context = RequestContext(request_id=str(uuid.uuid4()))
        request.scope[CONTEXT_SCOPE_KEY] = context
    return context


def authenticate(request: Request, config: EmulatorConfig) -> str:
    """Return the caller's API key, from ``X-API-Key`` or ``Authorization: Bearer``.

    :param request: the request.
    :param config: the emulator config.
    :raises ApiError: 401 when no key is sent or none is accepted.
    """
    x_api_key = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization")
    if not x_api_key and not authorization:
        raise ApiError(401, {"error": "missing API key"})
    candidates = [x_api_key.strip()] if x_api_key else []
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            candidates.append(token.strip())
    for candidate in candidates:
        if candidate in config.api_keys:
            return candidate
    raise ApiError(401, {"error": "invalid API key"})


async def admit(request: Request, label: str) -> Admission:
    """Count, authenticate, rate-limit and inject faults into a /v1 request.

    :param request: the request.
    :param label: the endpoint label counted in the ledger.
    :raises ApiError: 401, 429 or an injected 5xx.
    """
    emulator = _emulator(request)
    config = emulator.config
    emulator.ledger.requests[label] += 1
    api_key = authenticate(request, config)
    wait = emulator.limiter.acquire(
        api_key, time.monotonic(), config.requests_per_minute, config.rate_window, config.rate_limit
    )
    if wait is not None:
        raise too_many_requests(wait, config)
    emulator.ledger.count_admitted(time.time(), label)
    faults = emulator.draw_faults()
    if not config.faults_hit(label):
        faults = FaultDecision()
    if faults.slow:
        emulator.ledger.slow_injected += 1
        await asyncio.sleep(config.scaled(config.slow_seconds))
    if faults.kind == "5xx":
        emulator.ledger.responses_5xx_injected += 1
        raise ApiError(faults.status_code, {} if faults.empty_body else {"error": "internal server error"})
    if faults.kind == "429":
        emulator.ledger.responses_429_injected += 1
        raise too_many_requests(config.scaled(INJECTED_RETRY_AFTER_SECONDS), config)
    if faults.kind == "drop":
        emulator.ledger.drops_injected += 1
        _context(request).drop = True
    return Admission(api_key, faults.kind == "drop")


async def read_json_body(request: Request) -> Any:
    """Decode the request body as JSON.

    :param request: the request.
    :raises ApiError: 422 when the body is not valid JSON.
    """
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(422, {"error": f"malformed JSON body: {exc}"}) from None


def _bad_request(message: str) -> ApiError:
    return ApiError(400, {"error": message, "status": "error"})


def parse_create_body(body: Any) -> tuple[dict[str, Any], Any]:
    """Check the envelope of a create request.

    :param body: the decoded JSON body.
    :return: the body and its raw ``input``.
    :raises ApiError: 400 for a missing or invalid field, 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise _bad_request("request body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        raise _bad_request("missing required field: model")
    if not isinstance(model, str):
        raise _bad_request("field 'model' must be a string")
    if model != MODEL_SLUG:
        raise ApiError(404, {"error": "model not found"})
    for name in ("version", "webhook_url", "webhook_secret"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise _bad_request(f"field '{name}' must be a string")
    return body, body.get("input")


async def _create(request: Request, label: str) -> tuple[Admission, Prediction]:
    """Admit, validate and create a prediction: the one path of a create and a synchronous run.

    :param request: the request.
    :param label: ``create`` or ``run``, as counted in the ledger and matched by ``fault_endpoints``.
    :raises ApiError: 400/404/422 for a bad body (or a run while ``sync_run`` is off), 429 when
        ``max_in_flight`` is reached, 500 for an injected fault (after creating, for
        ``fault_created_5xx``).
    """
    admission = await admit(request, label)
    emulator = _emulator(request)
    if label == "run" and not emulator.config.sync_run:
        raise _bad_request(SYNC_RUN_REFUSAL)
    _, raw_input = parse_create_body(await read_json_body(request))
    try:
        model_input = parse_input(raw_input)
    except InputError as exc:
        raise _bad_request(exc.message) from None
    if emulator.in_flight(admission.api_key) >= emulator.config.max_in_flight:
        raise too_many_requests(
            emulator.next_slot_in(admission.api_key),
            emulator.config,
            f"too many predictions in flight (limit {emulator.config.max_in_flight})",
        )
    provider_fails, answer_5xx = emulator.draw_prediction_faults(model_input)
    prediction = emulator.create(admission.api_key, raw_input, model_input, provider_fails=provider_fails)
    if label == "run":
        emulator.ledger.runs += 1
    if answer_5xx and not admission.drop and emulator.config.faults_hit(label):
        emulator.ledger.created_5xx_injected += 1
        raise ApiError(500, {"error": "internal server error"})
    return admission, prediction


async def create_prediction(request: Request) -> Response:
    """``POST /v1/prediction/``: validate and create a prediction.

    :param request: the request.
    """
    _, prediction = await _create(request, "create")
    return JSONResponse(
        {"status": "success", "message": "Prediction created successfully", "predictionID": prediction.id},
        status_code=201 if _emulator(request).config.legacy else 200,
    )


#: The 400 of a synchronous run while ``sync_run`` is off (a model without synchronous execution).
SYNC_RUN_REFUSAL = "Synchronous execution is not enabled for model blip-2: create the prediction and poll it"

_RUN_MESSAGES = {
    "success": "Prediction completed successfully",
    "error": "Prediction failed",
    "cancelled": "Prediction was cancelled",
}


async def run_prediction(request: Request) -> Response:
    """``POST /v1/prediction/run``: create a prediction and answer when it has ended.

    A prediction that has not ended within ``sync_run_max_wait`` is answered ``processing`` with
    its id, for the client to poll. A drop fault drops the connection once the prediction ended.

    :param request: the request.
    """
    _, prediction = await _create(request, "run")
    emulator = _emulator(request)
    await emulator.wait_ended(prediction, emulator.config.scaled(emulator.config.sync_run_max_wait))
    return JSONResponse(run_answer(prediction, emulator.config.legacy))


def run_answer(prediction: Prediction, legacy: bool = False) -> dict[str, Any]:
    """Render the answer of a synchronous run.

    :param prediction: the prediction the run created, ended or still running.
    :param legacy: spell the status as the older docs do (``completed``, ``failed``, ``canceled``).
    """
    status = prediction.status if prediction.terminal else STATUS_PROCESSING
    return {
        "status": LEGACY_STATUSES.get(status, status) if legacy else status,
        "message": _RUN_MESSAGES.get(status, "Prediction is still running"),
        "predictionID": prediction.id,
        "output": prediction.output if prediction.terminal else None,
        "error": "" if status in (STATUS_SUCCESS, STATUS_PROCESSING) else _run_error(prediction),
    }


def _run_error(prediction: Prediction) -> str:
    """The user-facing message of a synchronous run that did not succeed.

    :param prediction: the ended prediction.
    """
    envelope = prediction.output if isinstance(prediction.output, dict) else {}
    message = envelope.get("error_message") or envelope.get("error")
    return str(message) if message else f"prediction {prediction.status}"


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def get_prediction(request: Request) -> Response:
    """``GET /v1/prediction/{id}``: read a prediction.

    :param request: the request.
    """
    admission = await admit(request, "get")
    if admission.drop:
        return Response()
    emulator = _emulator(request)
    prediction = emulator.get(request.path_params["prediction_id"], admission.api_key)
    if prediction is None:
        raise ApiError(404, {"error": "prediction not found"})
    body = prediction.to_json(_base_url(request))
    if emulator.config.legacy:
        body["status"] = LEGACY_STATUSES.get(body["status"], body["status"])
    return JSONResponse(body)


async def cancel_prediction(request: Request) -> Response:
    """``POST /v1/prediction/{id}/cancel``: cancel a running prediction (a no-op once terminal).

    :param request: the request.
    """
    admission = await admit(request, "cancel")
    if admission.drop:
        return Response()
    emulator = _emulator(request)
    prediction = emulator.get(request.path_params["prediction_id"], admission.api_key)
    if prediction is None:
        raise ApiError(500, {"error": "failed to cancel prediction: prediction not found"})
    if emulator.cancel(prediction):
        message = "Prediction cancelled successfully"
    else:
        message = f"Prediction already finished with status {prediction.status}"
    return JSONResponse({"status": "success", "message": message})


async def get_model(request: Request) -> Response:
    """``GET /v1/model?slug=blip-2``: the public model record with its ``request_schema``.

    :param request: the request.
    """
    admission = await admit(request, "model")
    if admission.drop:
        return Response()
    slug = request.query_params.get("slug")
    if not slug:
        raise _bad_request("missing query parameter: slug")
    if slug != MODEL_SLUG:
        raise ApiError(404, {"error": "model not found"})
    return JSONResponse(model_record())


async def get_ledger(request: Request) -> Response:
    """``GET /_emulator/ledger``: the counters of the emulator (no auth).

    :param request: the request.
    """
    return JSONResponse(_emulator(request).snapshot())


async def reset_state(request: Request) -> Response:
    """``POST /_emulator/reset``: forget predictions, counters and rate windows (no auth).

    :param request: the request.
    """
    _emulator(request).reset()
    return JSONResponse({"status": "success", "message": "emulator state cleared"})


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if _emulator(request).config.legacy:
        return _legacy_error(exc)
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


def _legacy_error(exc: ApiError) -> Response:
    """The older error shape: an empty body, and a 429's wait only as the body's ``retry_after``."""
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() != "retry-after"}
    body = {"retry_after": exc.body["retry_after"]} if "retry_after" in exc.body else {}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code, headers=exc.headers)


def create_app(config: EmulatorConfig | None = None) -> EmulatorApp:
    """Build the emulator's FastAPI app.

    :param config: the settings; defaults to :class:`EmulatorConfig` defaults.
    """
    emulator = Emulator(config or EmulatorConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await emulator.aclose()

    app = EmulatorApp(
        emulator,
        title="Eachlabs prediction API emulator (blip-2)",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_api_route("/v1/prediction/", create_prediction, methods=["POST"])
    app.add_api_route("/v1/prediction", create_prediction, methods=["POST"])
    app.add_api_route("/v1/prediction/run", run_prediction, methods=["POST"])
    app.add_api_route("/v1/prediction/run/", run_prediction, methods=["POST"])
    app.add_api_route("/v1/prediction/{prediction_id}", get_prediction, methods=["GET"])
    app.add_api_route("/v1/prediction/{prediction_id}/cancel", cancel_prediction, methods=["POST"])
    app.add_api_route("/v1/model", get_model, methods=["GET"])
    add_upload_routes(app)
    app.add_api_route("/_emulator/ledger", get_ledger, methods=["GET"])
    app.add_api_route("/_emulator/reset", reset_state, methods=["POST"])
    return app
