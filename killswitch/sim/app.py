"""The EMS simulator's aiohttp app: the EMS order paths plus a `/_sim/` control API.

EMS paths (as `coinapi-ems/openapi.yaml` documents them):

- `POST /v1/orders/cancel/all` `{"exchange_id": "KRAKEN/JOHN"}` cancels every open
  order of that account (any account id is accepted; an unknown one has none).
  The spec types its 200 as `MessageReject`, and a 200 is a rejection only when
  `type == "MESSAGE_REJECT"` with a non-empty `reject_reason`. The simulator answers
  a success with 200 `{"exchange_id": "KRAKEN/JOHN", "message": "Cancel all request
  accepted."}`: no `type`, no `reject_reason`. A rejection (`fail_next`) is a full
  `MessageReject`: `type`, `reject_reason`, `exchange_id`, `message`,
  `rejected_message`.
- `GET /v1/orders[?exchange_id=X]` lists open `OrderExecutionReport`s.
- `POST /v1/orders` opens an order (`OrderNewSingleRequest`) and returns its report.
- `POST /v1/orders/cancel` cancels one order by `client_order_id` or
  `exchange_order_id`; an unknown one is a 200 `MessageReject` `ORDER_ID_NOT_FOUND`.

Like the ASP.NET gateway, a POST body must be sent as JSON (`Content-Type:
application/json`, else 415) and an unusable one is a 400 `ValidationError`
(`application/problem+json`, `errors` as ASP.NET writes it: field -> messages).
Other paths answer 404 and other methods 405 (aiohttp's defaults). With an API key
configured, every EMS request needs it in `X-CoinAPI-Key` (or the `apikey` query
parameter, as the spec allows): otherwise 401 `{"message": ...}`.

Each EMS request is recorded on entry, before the API key check and any fault, and
then delayed by the global latency plus the account's `delay_seconds`. Served by
`running_simulator`, a handler whose client disconnects is cancelled; so a client
that gives up during a delay leaves the orders open.

Control paths (JSON in and out; never recorded; no API key):

- `POST /_sim/faults`: any of `{"exchange_id": X, "fail_next": {"n": 2, "status":
  200, "reject_reason": "EXCHANGE_RESPONSE_TIMEOUT"}}` (`status` and
  `reject_reason` optional, as in `Simulator.fail_next`), `{"exchange_id": X,
  "fault": {<Simulator.set_fault keyword arguments>}}`, `{"latency_seconds": 0.05}`.
- `GET /_sim/requests[?since=N]`: the record from index N, each
  `{"method", "path", "exchange_id", "received_monotonic", "headers", "body"}` with
  the body as text and the `X-CoinAPI-Key` value redacted.
- `POST /_sim/reset`: optional body `{"accounts": [...], "orders_per_account": N}`.
- `POST /_sim/orders` `{"exchange_id": X, "n": 3}`: open n more orders there.
- `GET /_sim/health`: `{"ok": true, "status": "ok", "accounts": N, "requests": N}`.

Every control answer is 200 `{"ok": true, ...}` or 400 `{"ok": false, "error": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, NamedTuple

from aiohttp import hdrs, web

from killswitch.sim.fast import FastFront, serve_fast
from killswitch.sim.faults import ScriptedFailure
from killswitch.sim.simulator import RecordedRequest, Simulator

_SIM: Final = web.AppKey("sim", Simulator)
_LOG_REQUESTS: Final = web.AppKey("log_requests", bool)

_JSON: Final = "application/json; charset=utf-8"
_PROBLEM_JSON: Final = "application/problem+json; charset=utf-8"
#: The spec's own spelling for 490 and 504 bodies; clients must parse JSON anyway.
_MISSPELT_JSON: Final = "appliction/json"
_API_KEY_HEADER: Final = "X-CoinAPI-Key"
_REASON_PHRASES: Final = {490: "Exchange Unreachable"}
_GARBAGE_BODY: Final = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"
_DRIP_PIECES: Final = 10
_HANG_POLL_SECONDS: Final = 0.05
_SHUTDOWN_TIMEOUT_SECONDS: Final = 0.25
_ACCEPTED_MESSAGE: Final = "Cancel all request accepted."

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Body(NamedTuple):
    """A POST body as the middleware parsed it, shared with the handler."""

    document: Any
    errors: dict[str, list[str]] | None  # ASP.NET `errors` when the JSON is unusable
    is_json_media: bool


_BODY: Final = web.RequestKey("body", _Body)
_NO_BODY: Final = _Body(None, {"": ["A non-empty request body is required."]}, True)


class _Field(NamedTuple):
    """One property of a request schema: its JSON kind and whether it is required."""

    kind: str  # "string", "number", "array" or an enum's .NET type name
    required: bool
    values: frozenset[str] = frozenset()


_CANCEL_ALL_SCHEMA: Final = {"exchange_id": _Field("string", required=True)}
_CANCEL_SCHEMA: Final = {
    "exchange_id": _Field("string", required=True),
    "client_order_id": _Field("string", required=False),
    "exchange_order_id": _Field("string", required=False),
}
_NEW_ORDER_SCHEMA: Final = {
    "exchange_id": _Field("string", required=True),
    "client_order_id": _Field("string", required=True),
    "symbol_id_exchange": _Field("string", required=False),
    "symbol_id_coinapi": _Field("string", required=False),
    "amount_order": _Field("number", required=True),
    "price": _Field("number", required=True),
    "side": _Field("OrdSide", required=True, values=frozenset({"BUY", "SELL"})),
    "order_type": _Field("OrdType", required=True, values=frozenset({"LIMIT"})),
    "time_in_force": _Field(
        "TimeInForce",
        required=True,
        values=frozenset(
            {
                "GOOD_TILL_CANCEL",
                "GOOD_TILL_TIME_EXCHANGE",
                "GOOD_TILL_TIME_OMS",
                "GOOD_TILL_TIME_OEML",
                "FILL_OR_KILL",
                "IMMEDIATE_OR_CANCEL",
            }
        ),
    ),
    "expire_time": _Field("string", required=False),
    "exec_inst": _Field("array", required=False),
}
_DOTNET_TYPES: Final = {"string": "System.String", "number": "System.Decimal"}


def create_sim_app(sim: Simulator, *, log_requests: bool = False) -> web.Application:
    """Build the aiohttp app that serves `sim` (see the module docstring for paths).

    Args:
        sim: the state to serve and record into.
        log_requests: write one line per EMS request to stdout.
    """
    app = web.Application(middlewares=[_ems_middleware])
    app[_SIM] = sim
    app[_LOG_REQUESTS] = log_requests
    app.router.add_post("/v1/orders/cancel/all", _cancel_all)
    app.router.add_post("/v1/orders/cancel", _cancel_one)
    app.router.add_get("/v1/orders", _list_orders, allow_head=False)
    app.router.add_post("/v1/orders", _new_order)
    app.router.add_post("/_sim/faults", _control_faults)
    app.router.add_get("/_sim/requests", _control_requests, allow_head=False)
    app.router.add_post("/_sim/reset", _control_reset)
    app.router.add_post("/_sim/orders", _control_orders)
    app.router.add_get("/_sim/health", _control_health, allow_head=False)
    return app


@contextlib.asynccontextmanager
async def running_simulator(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_requests: bool = False,
) -> AsyncIterator[str]:
    """Serve `sim` on `host:port` (0: any free port) for the duration of the block.

    Handlers whose client disconnects are cancelled, and shutdown cancels whatever is
    still running after about half a second (aiohttp waits the 0.25 s shutdown timeout
    twice), so hung and delayed requests never linger. Plain cancel-alls and order
    lists are answered by `FastFront` without aiohttp (see `killswitch.sim.fast`),
    except with `log_requests`.

    Args:
        sim: the simulator to serve.
        host: the address to bind.
        port: the port to bind; 0 picks a free one.
        log_requests: write one line per EMS request to stdout.

    Yields:
        The base URL, `http://HOST:PORT`, with the port actually bound.

    Raises:
        OSError: the address cannot be bound.
    """
    runner = web.AppRunner(
        create_sim_app(sim, log_requests=log_requests),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    listener: asyncio.Server | None = None
    fronts: set[FastFront] = set()
    try:
        if log_requests:
            # One log line per request is the app's job: no fast path then.
            await web.TCPSite(runner, host, port).start()
            bound_port = runner.addresses[0][1]
        else:
            listener, fronts = await serve_fast(sim, runner, host, port)
            bound_port = listener.sockets[0].getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound_port}"
    finally:
        if listener is not None:
            listener.close()
            for front in list(fronts):
                front.close()
        await runner.cleanup()


# --- the EMS paths ---------------------------------------------------------------


@web.middleware
async def _ems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record, authenticate and delay every EMS request; pass `/_sim/` through."""
    if request.path.startswith("/_sim/"):
        return await handler(request)
    sim = request.app[_SIM]
    received = sim.clock()
    raw = b""
    try:
        raw = await request.read()
    finally:
        # recorded even when the body is too large to read
        exchange_id = _exchange_id_of(request, raw)
        sim.record(
            RecordedRequest(
                method=request.method,
                path=request.path,
                exchange_id=exchange_id,
                received_monotonic=received,
                headers=request.headers,
                body=raw,
            )
        )
    if not request.app[_LOG_REQUESTS]:
        return await _authenticated_and_delayed(request, handler, sim, exchange_id)
    outcome = "error"
    try:
        response = await _authenticated_and_delayed(request, handler, sim, exchange_id)
        dropped = _is_disconnected(request)
        outcome = "dropped" if dropped else str(response.status)
    except web.HTTPException as exc:
        outcome = str(exc.status)
        raise
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        _write_log_line(request, exchange_id, outcome, sim.clock() - received)
    return response


async def _authenticated_and_delayed(
    request: web.Request, handler: Handler, sim: Simulator, exchange_id: str | None
) -> web.StreamResponse:
    if sim.api_key is not None and not _has_api_key(request, sim.api_key):
        return _json_response(401, {"message": "Missing or invalid API key."})
    delay_seconds = sim.faults.delay_seconds(exchange_id)
    if delay_seconds > 0:
        await asyncio.sleep(delay_seconds)
    return await handler(request)


def _has_api_key(request: web.Request, api_key: str) -> bool:
    offered = request.headers.get(_API_KEY_HEADER) or request.query.get("apikey", "")
    return hmac.compare_digest(offered.encode(), api_key.encode())


def _exchange_id_of(request: web.Request, raw: bytes) -> str | None:
    """Return the account a request names, parsing (and keeping) a POST's JSON body."""
    if request.method != hdrs.METH_POST:
        return request.query.get("exchange_id")
    body = _parse_body(request, raw)
    request[_BODY] = body
    if body.errors is None and isinstance(body.document, dict):
        exchange_id = body.document.get("exchange_id")
        if isinstance(exchange_id, str):
            return exchange_id
    return None


def _parse_body(request: web.Request, raw: bytes) -> _Body:
    media = request.content_type
    is_json_media = media in {"application/json", "text/json"} or media.endswith(
        "+json"
    )
    if not raw.strip():
        return _NO_BODY._replace(is_json_media=is_json_media)
    try:
        document = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        where = (
            f" LineNumber: {exc.lineno - 1} | BytePositionInLine: {exc.colno - 1}."
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        problem = f"The JSON value is invalid. Path: $ |{where}"
        return _Body(None, {"$": [problem.rstrip(" |")]}, is_json_media)
    return _Body(document, None, is_json_media)


async def _cancel_all(request: web.Request) -> web.StreamResponse:
    """`POST /v1/orders/cancel/all`: cancel an account's orders, faults permitting."""
    sim = request.app[_SIM]
    document, problem = _validated(request, _CANCEL_ALL_SCHEMA, "OrderCancelAllRequest")
    if problem is not None:
        return problem
    exchange_id: str = document["exchange_id"]
    failure = sim.faults.pop_failure(exchange_id)
    if failure is not None:
        rejected = {"exchange_id": exchange_id, "type": "ORDER_CANCEL_ALL_REQUEST"}
        return _scripted_failure(failure, exchange_id, rejected)
    faults = sim.faults.standing(exchange_id)
    if faults.hang:
        await _until_disconnected(request)
        return web.Response(status=504)  # nobody is left to read it
    if faults.drop:
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=502)  # never written: the transport is closed
    if not sim.faults.take_survival(exchange_id):
        sim.book.cancel_all(exchange_id)
    if faults.garbage_body:
        return web.Response(body=_GARBAGE_BODY, headers={hdrs.CONTENT_TYPE: _JSON})
    body = _dumps({"exchange_id": exchange_id, "message": _ACCEPTED_MESSAGE})
    body = body.ljust(faults.huge_body_bytes)
    if faults.drip_seconds > 0:
        return await _drip(request, body, faults.drip_seconds)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: _JSON})


async def _cancel_one(request: web.Request) -> web.StreamResponse:
    """`POST /v1/orders/cancel`: cancel one order by either of its ids."""
    sim = request.app[_SIM]
    document, problem = _validated(request, _CANCEL_SCHEMA, "OrderCancelSingleRequest")
    if problem is not None:
        return problem
    client_order_id = document.get("client_order_id")
    exchange_order_id = document.get("exchange_order_id")
    if not client_order_id and not exchange_order_id:
        message = "One of client_order_id or exchange_order_id is required."
        return _validation_error({"client_order_id": [message]})
    exchange_id: str = document["exchange_id"]
    report = sim.book.cancel(
        exchange_id,
        client_order_id=client_order_id,
        exchange_order_id=exchange_order_id,
    )
    if report is not None:
        return _json_response(200, report)
    rejected = {**document, "type": "ORDER_CANCEL_SINGLE_REQUEST"}
    reject = _message_reject(
        "ORDER_ID_NOT_FOUND",
        exchange_id,
        f"Order with ID: {client_order_id or exchange_order_id} not found",
        rejected,
    )
    return _json_response(200, reject)


async def _list_orders(request: web.Request) -> web.StreamResponse:
    """`GET /v1/orders`: the open orders of one account, or of all."""
    orders = request.app[_SIM].book.open_orders(request.query.get("exchange_id"))
    return _json_response(200, orders)


async def _new_order(request: web.Request) -> web.StreamResponse:
    """`POST /v1/orders`: open a limit order and return its report (status NEW)."""
    sim = request.app[_SIM]
    document, problem = _validated(request, _NEW_ORDER_SCHEMA, "OrderNewSingleRequest")
    if problem is not None:
        return problem
    errors: dict[str, list[str]] = {}
    if not document.get("symbol_id_exchange") and not document.get("symbol_id_coinapi"):
        errors["symbol_id_exchange"] = [
            "One of symbol_id_exchange or symbol_id_coinapi is required."
        ]
    if document["time_in_force"].startswith("GOOD_TILL_TIME") and not document.get(
        "expire_time"
    ):
        errors["expire_time"] = ["expire_time is required for this time_in_force."]
    if errors:
        return _validation_error(errors)
    request_fields = {k: v for k, v in document.items() if k in _NEW_ORDER_SCHEMA}
    report = sim.book.add(request_fields)
    if report is None:
        message = f"An open order with client_order_id {document['client_order_id']!r}"
        return _validation_error({"client_order_id": [f"{message} already exists."]})
    return _json_response(200, report)


def _validated(
    request: web.Request, schema: Mapping[str, _Field], model: str
) -> tuple[dict[str, Any], web.Response | None]:
    """Check a POST body against `schema` the way ASP.NET model binding does."""
    body = request.get(_BODY, _NO_BODY)
    if not body.is_json_media:
        return {}, _problem(
            415,
            "Unsupported Media Type",
            "https://tools.ietf.org/html/rfc7231#section-6.5.13",
        )
    if body.errors is not None:
        return {}, _validation_error(body.errors)
    document = body.document
    if not isinstance(document, dict):
        problem = f"The JSON value could not be converted to {model}. Path: $."
        return {}, _validation_error({"$": [problem]})
    errors: dict[str, list[str]] = {}
    for name, field in schema.items():
        value = document.get(name)
        if value is None:
            if field.required:
                errors[name] = [f"The {name} field is required."]
        elif not _is_kind(value, field):
            dotnet = _DOTNET_TYPES.get(field.kind, f"CoinAPI.EMS.{field.kind}")
            errors[f"$.{name}"] = [
                f"The JSON value could not be converted to {dotnet}. Path: $.{name}."
            ]
        elif field.required and value == "":
            errors[name] = [f"The {name} field is required."]
    if errors:
        return {}, _validation_error(errors)
    return document, None


def _is_kind(value: object, field: _Field) -> bool:
    if field.kind == "string":
        return isinstance(value, str)
    if field.kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if field.kind == "array":
        return isinstance(value, list)
    return isinstance(value, str) and value in field.values


async def _until_disconnected(request: web.Request) -> None:
    """Wait until the client goes away (or the handler is cancelled at shutdown)."""
    # aiohttp offers no disconnect event to a handler that has read its body: poll
    while not _is_disconnected(request):  # noqa: ASYNC110
        await asyncio.sleep(_HANG_POLL_SECONDS)


def _is_disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _drip(
    request: web.Request, body: bytes, drip_seconds: float
) -> web.StreamResponse:
    """Send `body` in pieces spread over `drip_seconds`, its length declared."""
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: _JSON})
    response.content_length = len(body)
    await response.prepare(request)
    pieces = min(_DRIP_PIECES, len(body))
    step = -(-len(body) // pieces)
    for start in range(0, len(body), step):
        await asyncio.sleep(drip_seconds / pieces)
        await response.write(body[start : start + step])
    await response.write_eof()
    return response


# --- response bodies -------------------------------------------------------------


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _json_response(
    status: int,
    payload: object,
    content_type: str = _JSON,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        reason=_phrase(status),
        body=_dumps(payload),
        headers={hdrs.CONTENT_TYPE: content_type, **(headers or {})},
    )


def _message_reject(
    reject_reason: str, exchange_id: str, message: str, rejected: Mapping[str, Any]
) -> dict[str, str]:
    return {
        "type": "MESSAGE_REJECT",
        "reject_reason": reject_reason,
        "exchange_id": exchange_id,
        "message": message,
        "rejected_message": json.dumps(rejected, separators=(",", ":")),
    }


def _reject_message(reject_reason: str, exchange_id: str) -> str:
    if reject_reason == "EXCHANGE_RESPONSE_TIMEOUT":
        return f"Exchange {exchange_id} didn't respond in the defined timeout."
    if reject_reason == "EXCHANGE_UNREACHABLE":
        return f"Exchange {exchange_id} is unreachable."
    return f"Request rejected by {exchange_id}: {reject_reason}."


def _trace_id() -> str:
    return f"{secrets.token_hex(4)}-{secrets.token_hex(8)}"


def _problem(
    status: int, title: str, type_uri: str, errors: dict[str, list[str]] | None = None
) -> web.Response:
    payload: dict[str, object] = {
        "type": type_uri,
        "title": title,
        "status": status,
        "traceId": _trace_id(),
    }
    if errors is not None:
        payload["errors"] = errors
    return _json_response(status, payload, _PROBLEM_JSON)


def _validation_error(errors: dict[str, list[str]]) -> web.Response:
    return _problem(
        400,
        "One or more validation errors occurred.",
        "https://tools.ietf.org/html/rfc7231#section-6.5.1",
        errors,
    )


def _scripted_failure(
    failure: ScriptedFailure, exchange_id: str, rejected: Mapping[str, Any]
) -> web.Response:
    """Answer a `fail_next` failure (see `Simulator.fail_next` for the bodies)."""
    status = failure.status
    headers: dict[str, str] = {hdrs.RETRY_AFTER: "1"} if status == 429 else {}
    if status == 400:
        return _validation_error(
            {"exchange_id": ["The exchange_id value is not valid."]}
        )
    if failure.reject_reason:
        reject = _message_reject(
            failure.reject_reason,
            exchange_id,
            _reject_message(failure.reject_reason, exchange_id),
            rejected,
        )
        content_type = _MISSPELT_JSON if status in {490, 504} else _JSON
        return _json_response(status, reject, content_type, headers)
    if status in {401, 403}:
        return web.Response(status=status, headers=headers)
    phrase = _phrase(status)
    return web.Response(status=status, reason=phrase, text=phrase, headers=headers)


def _phrase(status: int) -> str:
    try:
        return _REASON_PHRASES.get(status) or http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _write_log_line(
    request: web.Request, exchange_id: str | None, status: str, elapsed_seconds: float
) -> None:
    sys.stdout.write(
        f"ems-sim request method={request.method} path={request.path} "
        f"exchange_id={exchange_id or '-'} status={status} "
        f"duration_ms={elapsed_seconds * 1000:.3f}\n"
    )
    sys.stdout.flush()


# --- the /_sim/ control API ------------------------------------------------------

_FAULT_KINDS: Final = {
    "delay_seconds": "number",
    "hang": "bool",
    "drop": "bool",
    "survive_cancels": "int",
    "garbage_body": "bool",
    "huge_body_bytes": "int",
    "drip_seconds": "number",
}


class _ControlError(ValueError):
    """A control request is unusable; its message is the answer's `error`."""


def _ok(**fields: object) -> web.Response:
    return _json_response(200, {"ok": True, **fields})


def _checked(name: str, value: object, kind: str) -> Any:
    """Return `value` if it is of JSON `kind`, else raise `_ControlError`."""
    ok = {
        "str": isinstance(value, str) and value != "",
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "object": isinstance(value, dict),
    }[kind]
    if not ok:
        msg = f"{name}: {value!r} is not a valid {kind}"
        raise _ControlError(msg)
    return value


async def _control_document(
    request: web.Request, *, optional: bool = False
) -> dict[str, Any]:
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except ValueError as exc:
        msg = f"body: not JSON ({exc})"
        raise _ControlError(msg) from exc
    result: dict[str, Any] = _checked("body", document, "object")
    return result


def _control(handler: Handler) -> Handler:
    """Turn `_ControlError` and the simulator's `ValueError`s into a 400 answer."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ValueError as exc:
            return _json_response(400, {"ok": False, "error": str(exc)})

    return wrapper


@_control
async def _control_faults(request: web.Request) -> web.StreamResponse:
    sim = request.app[_SIM]
    document = await _control_document(request)
    unknown = set(document) - {"exchange_id", "fail_next", "fault", "latency_seconds"}
    if unknown:
        msg = f"unknown keys: {sorted(unknown)}"
        raise _ControlError(msg)
    exchange_id = ""
    if "fail_next" in document or "fault" in document:
        exchange_id = _checked("exchange_id", document.get("exchange_id"), "str")
    if "latency_seconds" in document:
        sim.set_latency(
            _checked("latency_seconds", document["latency_seconds"], "number")
        )
    if "fail_next" in document:
        spec = _checked("fail_next", document["fail_next"], "object")
        unknown = set(spec) - {"n", "status", "reject_reason"}
        if unknown:
            msg = f"fail_next: unknown keys: {sorted(unknown)}"
            raise _ControlError(msg)
        n = _checked("fail_next.n", spec.get("n"), "int")
        status = _checked("fail_next.status", spec.get("status", 200), "int")
        if "reject_reason" not in spec:
            sim.fail_next(exchange_id, n, status=status)
        else:
            reason = spec["reject_reason"]
            if reason is not None:
                _checked("fail_next.reject_reason", reason, "str")
            sim.fail_next(exchange_id, n, status=status, reject_reason=reason)
    if "fault" in document:
        fault = _checked("fault", document["fault"], "object")
        unknown = set(fault) - set(_FAULT_KINDS)
        if unknown:
            msg = f"fault: unknown keys: {sorted(unknown)}"
            raise _ControlError(msg)
        kwargs = {
            k: _checked(f"fault.{k}", v, _FAULT_KINDS[k]) for k, v in fault.items()
        }
        sim.set_fault(exchange_id, **kwargs)
    return _ok()


async def _control_requests(request: web.Request) -> web.StreamResponse:
    since = request.query.get("since", "0")
    start = int(since) if since.isdigit() else 0
    records = [
        {
            "method": r.method,
            "path": r.path,
            "exchange_id": r.exchange_id,
            "received_monotonic": r.received_monotonic,
            "headers": {
                k: "<redacted>" if k.lower() == _API_KEY_HEADER.lower() else v
                for k, v in r.headers.items()
            },
            "body": r.body.decode("utf-8", "replace"),
        }
        for r in request.app[_SIM].requests[start:]
    ]
    return _json_response(200, records)


@_control
async def _control_reset(request: web.Request) -> web.StreamResponse:
    document = await _control_document(request, optional=True)
    unknown = set(document) - {"accounts", "orders_per_account"}
    if unknown:
        msg = f"unknown keys: {sorted(unknown)}"
        raise _ControlError(msg)
    accounts = document.get("accounts")
    if accounts is not None and not (
        isinstance(accounts, list) and all(isinstance(a, str) and a for a in accounts)
    ):
        msg = f"accounts: {accounts!r} must be a list of non-empty strings"
        raise _ControlError(msg)
    per_account = document.get("orders_per_account")
    if (
        per_account is not None
        and _checked("orders_per_account", per_account, "int") < 0
    ):
        msg = f"orders_per_account: {per_account!r} must be >= 0"
        raise _ControlError(msg)
    request.app[_SIM].reset(accounts=accounts, orders_per_account=per_account)
    return _ok()


@_control
async def _control_orders(request: web.Request) -> web.StreamResponse:
    sim = request.app[_SIM]
    document = await _control_document(request)
    exchange_id = _checked("exchange_id", document.get("exchange_id"), "str")
    n = _checked("n", document.get("n"), "int")
    if n < 0:
        msg = f"n: {n!r} must be >= 0"
        raise _ControlError(msg)
    sim.add_orders(exchange_id, n)
    return _ok(exchange_id=exchange_id, open=sim.book.count(exchange_id))


async def _control_health(request: web.Request) -> web.StreamResponse:
    sim = request.app[_SIM]
    return _ok(status="ok", accounts=len(sim.accounts), requests=len(sim.requests))
