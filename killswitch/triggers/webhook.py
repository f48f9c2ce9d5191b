"""aiohttp handlers for the trip webhooks: auth, parse, trip; fail safe on bad bodies."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from killswitch.config import Config, Permission, TokenConfig
from killswitch.errors import TriggerError
from killswitch.switch import Switch, TripReceipt
from killswitch.triggers import TripRequest
from killswitch.triggers.alerts import firing_trip, parse_payload

log = structlog.get_logger()

SWITCH_KEY = web.AppKey("switch", Switch)
CONFIG_KEY: web.AppKey[Callable[[], Config]] = web.AppKey("config")
REPLAY_GUARD_KEY = web.AppKey("replay_guard", dict[str, float])
GRAFANA_MAX_SKEW_SECONDS = 300.0
REPLAY_GUARD_MAX_ENTRIES = 10_000


def json_error(status: int, code: str, detail: str) -> web.Response:
    """SPEC's error shape: {"error": CODE, "detail": TEXT}."""
    return web.json_response({"error": code, "detail": detail}, status=status)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def find_token(tokens: tuple[TokenConfig, ...], presented: str) -> TokenConfig | None:
    """The configured token equal to `presented`, compared in constant time."""
    found = None
    given = presented.encode()
    for token in tokens:
        # Compare against every token so timing does not reveal which one matched.
        if hmac.compare_digest(token.token.encode(), given):
            found = token
    return found


def authorize(request: web.Request, permission: Permission) -> str | web.Response:
    """The token's name when it holds `permission`, else a 401/403 response."""
    presented = _bearer(request)
    if presented is None:
        return json_error(401, "unauthorized", "missing bearer token")
    token = find_token(request.app[CONFIG_KEY]().api.tokens, presented)
    if token is None:
        return json_error(401, "unauthorized", "unknown token")
    if permission not in token.permissions:
        return json_error(
            403, "forbidden", f"token {token.name!r} lacks {permission!r}"
        )
    return token.name


def _receipt(receipt: TripReceipt, extra_notes: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "trip_id": receipt.trip_id,
        "accounts": list(receipt.accounts),
        "state": "tripped",
        "notes": list(extra_notes + receipt.notes),
        "coalesced": list(receipt.coalesced),
    }


def _parse_trip_body(body: bytes) -> tuple[str, tuple[str, ...] | None, list[str]]:
    """Reason, accounts and notes from a /v1/trip body; anything odd widens to all."""
    reason = "webhook trip"
    if not body.strip():
        return reason, None, ["no body: tripping all accounts"]
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return reason, None, ["body is not JSON: tripping all accounts"]
    if not isinstance(doc, dict):
        return reason, None, ["body is not a JSON object: tripping all accounts"]
    notes = []
    raw_reason = doc.get("reason")
    if isinstance(raw_reason, str) and raw_reason.strip():
        reason = raw_reason.strip()[:500]
    elif raw_reason is not None:
        notes.append("'reason' is not a non-empty string; ignored")
    accounts = doc.get("accounts")
    if accounts is None:
        return reason, None, notes
    if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
        notes.append("'accounts' is not a list of strings: tripping all accounts")
        return reason, None, notes
    return reason, tuple(accounts), notes


async def handle_trip(request: web.Request) -> web.Response:
    """POST /v1/trip: an authenticated request always trips something."""
    seen = time.monotonic()
    who = authorize(request, "trip")
    if isinstance(who, web.Response):
        return who
    body = await request.read()
    reason, accounts, notes = _parse_trip_body(body)
    receipt = request.app[SWITCH_KEY].trip(
        TripRequest(
            source="webhook", reason=reason, accounts=accounts, actor=who,
            notes=tuple(notes), seen_monotonic=seen,
        )
    )  # fmt: skip
    return web.json_response(_receipt(receipt), status=202)


async def _trip_on_alerts(
    request: web.Request, seen: float, who: str, kind: str
) -> web.Response:
    body = await request.read()
    cfg = request.app[CONFIG_KEY]().triggers
    section = cfg.alertmanager if kind == "alertmanager" else cfg.grafana
    assert section is not None  # checked by the caller
    source: Any = kind
    try:
        doc = parse_payload(body, kind)
    except TriggerError as exc:
        # Fail safe: an authenticated alert we cannot read trips everything.
        receipt = request.app[SWITCH_KEY].trip(
            TripRequest(
                source=source, reason=f"unreadable {kind} payload", actor=who,
                notes=(f"{exc}: tripping all accounts",), seen_monotonic=seen,
            )
        )  # fmt: skip
        return web.json_response(_receipt(receipt), status=200)
    trip = firing_trip(doc, section.match, source, who)
    if trip is None:
        return web.json_response(
            {"tripped": False, "detail": "no matching firing alert"}
        )
    trip = TripRequest(
        source=trip.source, reason=trip.reason, accounts=trip.accounts,
        actor=trip.actor, notes=trip.notes, seen_monotonic=seen,
    )  # fmt: skip
    receipt = request.app[SWITCH_KEY].trip(trip)
    return web.json_response({"tripped": True, **_receipt(receipt)}, status=200)


async def handle_alertmanager(request: web.Request) -> web.Response:
    """POST /v1/alertmanager: Alertmanager webhook v4."""
    seen = time.monotonic()
    who = authorize(request, "trip")
    if isinstance(who, web.Response):
        return who
    if request.app[CONFIG_KEY]().triggers.alertmanager is None:
        return json_error(404, "not_found", "triggers.alertmanager is not configured")
    return await _trip_on_alerts(request, seen, who, "alertmanager")


def _verify_grafana_signature(request: web.Request, body: bytes) -> str | web.Response:
    grafana = request.app[CONFIG_KEY]().triggers.grafana
    assert grafana is not None
    assert grafana.hmac_secret is not None
    signature = request.headers.get(grafana.hmac_header, "").strip().lower()
    if not signature:
        return json_error(401, "unauthorized", f"missing {grafana.hmac_header}")
    signed = body
    if grafana.timestamp_header is not None:
        stamp = request.headers.get(grafana.timestamp_header, "").strip()
        try:
            skew = abs(time.time() - float(stamp))
        except ValueError:
            return json_error(401, "unauthorized", f"bad {grafana.timestamp_header}")
        if skew > GRAFANA_MAX_SKEW_SECONDS:
            return json_error(401, "unauthorized", "timestamp outside 300 s")
        signed = stamp.encode() + b":" + body
    expected = hmac.new(
        grafana.hmac_secret.encode(), signed, hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return json_error(401, "unauthorized", "bad signature")
    if grafana.timestamp_header is not None and not _first_sighting(request, expected):
        return json_error(401, "unauthorized", "replayed signature")
    return "grafana-hmac"


def _first_sighting(request: web.Request, signature: str) -> bool:
    """Remember signatures for the skew window: the same signed body twice is a replay."""
    seen = request.app[REPLAY_GUARD_KEY]
    now = time.monotonic()
    if len(seen) >= REPLAY_GUARD_MAX_ENTRIES:
        for key in [k for k, expiry in seen.items() if expiry < now]:
            del seen[key]
    if signature in seen and seen[signature] >= now:
        return False
    if len(seen) >= REPLAY_GUARD_MAX_ENTRIES:
        return False  # flooded with fresh signatures: refuse rather than grow
    seen[signature] = now + 2 * GRAFANA_MAX_SKEW_SECONDS
    return True


async def handle_grafana(request: web.Request) -> web.Response:
    """POST /v1/grafana: Grafana alerting webhook, bearer token or HMAC signature."""
    seen = time.monotonic()
    if request.app[CONFIG_KEY]().triggers.grafana is None:
        return json_error(404, "not_found", "triggers.grafana is not configured")
    who: str | web.Response = json_error(401, "unauthorized", "missing bearer token")
    if _bearer(request) is not None:
        who = authorize(request, "trip")
    grafana = request.app[CONFIG_KEY]().triggers.grafana
    if not isinstance(who, str) and grafana and grafana.hmac_secret is not None:
        who = _verify_grafana_signature(request, await request.read())
    if isinstance(who, web.Response):
        return who
    return await _trip_on_alerts(request, seen, who, "grafana")
