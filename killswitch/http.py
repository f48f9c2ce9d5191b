"""create_app(): the daemon's one HTTP listener: /v1/*, /metrics, /healthz, /readyz."""

from __future__ import annotations

import json
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from killswitch.config import Config
from killswitch.metrics import Metrics
from killswitch.switch import Switch
from killswitch.triggers.alerts import MAX_REASON_CHARS
from killswitch.triggers.webhook import (
    CONFIG_KEY,
    REPLAY_GUARD_KEY,
    SWITCH_KEY,
    UnreadableBodyError,
    authorize,
    handle_alertmanager,
    handle_grafana,
    handle_trip,
    json_error,
    read_body,
)

log = structlog.get_logger()


@dataclass(slots=True)
class Readiness:
    """What /readyz reports: config loaded, listener up, EMS connections warm."""

    listening: bool = False
    ems_warm: dict[str, bool] = field(default_factory=dict)

    @property
    def is_ready(self) -> bool:
        """True once listening and every EMS answered its warm-up probe."""
        return self.listening and bool(self.ems_warm) and all(self.ems_warm.values())


READINESS_KEY = web.AppKey("readiness", Readiness)
METRICS_KEY = web.AppKey("metrics", Metrics)
_ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
    500: "internal_error",
}  # fmt: skip

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_and_counts(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """JSON errors for everything aiohttp raises, and a request counter per endpoint."""
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "other"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _ERROR_CODES.get(exc.status, "error")
        response = json_error(exc.status, code, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:  # noqa: BLE001 - logged in full, answered 500
        # A bug in one request's handling must not take the kill switch down with
        # it: say so loudly, answer 500, keep serving every other request. The
        # traceback goes without frame locals: a local may hold a token.
        log.error(
            "http_request_failed",
            endpoint=endpoint,
            error=type(exc).__name__,
            traceback="".join(traceback.format_exception(exc)),
        )
        response = json_error(500, "internal_error", "see the daemon log")
    request.app[METRICS_KEY].http_requests.labels(
        endpoint=endpoint, code=str(response.status)
    ).inc()
    return response


def _parse_reset_body(
    body: bytes, known: tuple[str, ...]
) -> tuple[str, list[str] | None] | str:
    """(reason, accounts) from a /v1/reset body, or what is wrong with it."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return "body must be a JSON object with 'reason'"
    unknown_keys = sorted(str(k)[:40] for k in doc if k not in ("reason", "accounts"))
    if unknown_keys:
        return f"unknown keys {unknown_keys[:10]}"
    reason = doc.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return "'reason' must be a non-empty string"
    accounts = doc.get("accounts")
    if accounts is None:
        return reason.strip()[:MAX_REASON_CHARS], None
    if (
        not isinstance(accounts, list)
        or not accounts
        or not all(isinstance(a, str) for a in accounts)
    ):
        return "'accounts' must be a non-empty list of strings (omit it for all)"
    # A typo must not silently reset nothing (or something else): refuse it.
    unknown = [a for a in accounts if a not in known]
    if unknown:
        return f"unknown accounts {[a[:40] for a in unknown[:10]]}"
    return reason.strip()[:MAX_REASON_CHARS], accounts


async def handle_reset(request: web.Request) -> web.Response:
    """POST /v1/reset: re-arm; needs a token with `reset`; strict body."""
    who = authorize(request, "reset")
    if isinstance(who, web.Response):
        return who
    switch = request.app[SWITCH_KEY]
    try:
        body = await read_body(request)
    except UnreadableBodyError as exc:
        return json_error(exc.status, exc.code, exc.detail)
    parsed = _parse_reset_body(body, switch.latch.accounts)
    if isinstance(parsed, str):
        return json_error(400, "bad_request", parsed)
    reason, accounts = parsed
    receipt = switch.reset(accounts, reason, who)
    return web.json_response(
        {
            "reset": list(receipt.reset),
            "still_sweeping": list(receipt.still_sweeping),
            "notes": list(receipt.notes),
            "state": "tripped" if switch.latch.is_any_tripped else "armed",
        }
    )


async def handle_status(request: web.Request) -> web.Response:
    """GET /v1/status."""
    who = authorize(request, "status")
    if isinstance(who, web.Response):
        return who
    return web.json_response(request.app[SWITCH_KEY].status())


async def handle_healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the event loop runs."""
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 once listening with warm EMS connections, else 503."""
    readiness = request.app[READINESS_KEY]
    body = {
        "ready": readiness.is_ready,
        "listening": readiness.listening,
        "ems_warm": readiness.ems_warm,
    }
    return web.json_response(body, status=200 if readiness.is_ready else 503)


def create_app(
    switch: Switch,
    metrics: Metrics,
    config: Callable[[], Config],
    readiness: Readiness,
) -> web.Application:
    """The daemon's API; `config` returns the current config (it changes on reload)."""
    app = web.Application(
        client_max_size=config().api.max_body_bytes,
        middlewares=[_errors_and_counts],
    )
    app[SWITCH_KEY] = switch
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = readiness
    app[REPLAY_GUARD_KEY] = {}
    app.router.add_post("/v1/trip", handle_trip)
    app.router.add_post("/v1/alertmanager", handle_alertmanager)
    app.router.add_post("/v1/grafana", handle_grafana)
    app.router.add_post("/v1/reset", handle_reset)
    app.router.add_get("/v1/status", handle_status)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    return app
