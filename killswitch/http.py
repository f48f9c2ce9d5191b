"""create_app(): the daemon's one HTTP listener: /v1/*, /metrics, /healthz, /readyz."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from killswitch.config import Config
from killswitch.metrics import Metrics
from killswitch.switch import Switch
from killswitch.triggers.webhook import (
    CONFIG_KEY,
    REPLAY_GUARD_KEY,
    SWITCH_KEY,
    authorize,
    handle_alertmanager,
    handle_grafana,
    handle_trip,
    json_error,
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
    405: "method_not_allowed", 413: "payload_too_large",
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
    request.app[METRICS_KEY].http_requests.labels(
        endpoint=endpoint, code=str(response.status)
    ).inc()
    return response


async def handle_reset(request: web.Request) -> web.Response:
    """POST /v1/reset: re-arm; needs a token with `reset`; strict body."""
    who = authorize(request, "reset")
    if isinstance(who, web.Response):
        return who
    switch = request.app[SWITCH_KEY]
    try:
        doc = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return json_error(
            400, "bad_request", "body must be a JSON object with 'reason'"
        )
    if not isinstance(doc, dict):
        return json_error(
            400, "bad_request", "body must be a JSON object with 'reason'"
        )
    reason = doc.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return json_error(400, "bad_request", "'reason' must be a non-empty string")
    accounts = doc.get("accounts")
    if accounts is not None:
        if not isinstance(accounts, list) or not all(
            isinstance(a, str) for a in accounts
        ):
            return json_error(
                400, "bad_request", "'accounts' must be a list of strings"
            )
        # A typo must not silently reset nothing (or something else): refuse it.
        unknown = [a for a in accounts if a not in switch.latch.accounts]
        if unknown:
            return json_error(400, "bad_request", f"unknown accounts {unknown}")
    receipt = switch.reset(accounts, reason.strip(), who)
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
