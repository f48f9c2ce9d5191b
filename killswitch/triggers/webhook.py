"""aiohttp handlers for the trip webhooks: auth, size limit, parse, trip; fail safe."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from killswitch.config import Config, GrafanaConfig, Permission, TokenConfig
from killswitch.errors import TriggerError
from killswitch.switch import Switch, TripReceipt
from killswitch.triggers import Source, TripRequest
from killswitch.triggers.alerts import (
    MAX_REASON_CHARS,
    AlertSource,
    firing_trip,
    parse_payload,
)

log = structlog.get_logger()

SWITCH_KEY = web.AppKey("switch", Switch)
CONFIG_KEY: web.AppKey[Callable[[], Config]] = web.AppKey("config")
REPLAY_GUARD_KEY = web.AppKey("replay_guard", dict[str, float])
GRAFANA_MAX_SKEW_SECONDS = 300.0
REPLAY_GUARD_MAX_ENTRIES = 10_000
TRIP_BODY_KEYS = frozenset({"reason", "accounts"})
# A trip body is at most max_body_bytes from a nearby risk system: it arrives in
# milliseconds. One that stalls must not hold a trip back (fail safe).
BODY_READ_SECONDS = 1.0
# The 202 waits for the trip to be on disk (a restart then re-sweeps it), but
# never long: the cancel-alls are already out, and a broken disk is reported.
PERSIST_WAIT_SECONDS = 1.0


def json_error(status: int, code: str, detail: str) -> web.Response:
    """SPEC's error shape: {"error": CODE, "detail": TEXT}."""
    return web.json_response({"error": code, "detail": detail}, status=status)


class UnreadableBodyError(Exception):
    """The request body cannot be had: over the size limit, or the client left."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


async def read_body(request: web.Request) -> bytes:
    """The request body, if within `api.max_body_bytes` and `BODY_READ_SECONDS`.

    The limit is read from the live config, so a reload changes it at once.

    Raises:
        UnreadableBodyError: the body is over the limit (413), stalls (408), or
            the connection was lost before all of it arrived (400).
    """
    limit = request.app[CONFIG_KEY]().api.max_body_bytes
    too_large = UnreadableBodyError(
        413, "payload_too_large", f"body over api.max_body_bytes ({limit} bytes)"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:  # chunked, so no Content-Length to check first
                    raise too_large
                chunks.append(chunk)
    except TimeoutError as exc:
        detail = f"body not received within {BODY_READ_SECONDS:g} s"
        raise UnreadableBodyError(408, "request_timeout", detail) from exc
    except ConnectionResetError as exc:
        detail = "connection lost before the whole body arrived"
        raise UnreadableBodyError(400, "bad_request", detail) from exc
    return b"".join(chunks)


async def _body_or_problem(request: web.Request) -> bytes | UnreadableBodyError:
    try:
        return await read_body(request)
    except UnreadableBodyError as exc:
        return exc


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def find_token(tokens: tuple[TokenConfig, ...], presented: str) -> TokenConfig | None:
    """The configured token equal to `presented`, compared in constant time."""
    found = None
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: keep them.
    given = presented.encode("utf-8", "surrogateescape")
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


async def _receipt(request: web.Request, receipt: TripReceipt) -> dict[str, Any]:
    """The reply to a trip, sent once the trip is on disk (or after a bounded wait)."""
    switch = request.app[SWITCH_KEY]
    persisted = await switch.wait_persisted(receipt, PERSIST_WAIT_SECONDS)
    notes = list(receipt.notes)
    if not persisted:
        notes.append(
            f"not on disk after {PERSIST_WAIT_SECONDS:g} s (see /v1/status "
            "persistence_error): the cancels are out, but a crash now forgets it"
        )
    return {
        "trip_id": receipt.trip_id,
        "accounts": list(receipt.accounts),
        "state": "tripped",
        "persisted": persisted,
        "notes": notes,
        "coalesced": list(receipt.coalesced),
    }


def _trip_everything(
    request: web.Request, source: Source, who: str, note: str, seen: float
) -> TripReceipt:
    """Fail safe: an authenticated request we cannot read trips every account."""
    return request.app[SWITCH_KEY].trip(
        TripRequest(
            source=source, reason=f"unreadable {source} request", actor=who,
            notes=(f"{note}: tripping all accounts",), seen_monotonic=seen,
        )
    )  # fmt: skip


async def _unreadable(
    request: web.Request,
    problem: UnreadableBodyError,
    source: Source,
    who: str,
    seen: float,
) -> web.Response:
    """Trip everything, then answer the body's problem (4xx) along with the trip."""
    receipt = _trip_everything(request, source, who, problem.detail, seen)
    detail = f"{problem.detail}; tripped all accounts anyway (fail safe)"
    body: dict[str, Any] = {"error": problem.code, "detail": detail}
    body |= await _receipt(request, receipt)
    return web.json_response(body, status=problem.status)


def _parse_trip_body(body: bytes) -> tuple[str, tuple[str, ...] | None, list[str]]:
    """Reason, accounts and notes from a /v1/trip body; anything odd widens to all."""
    reason = "webhook trip"
    if not body.strip():
        return reason, None, ["no body: tripping all accounts"]
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: json's C scanner recurses once per nesting level.
        return reason, None, ["body is not JSON: tripping all accounts"]
    if not isinstance(doc, dict):
        return reason, None, ["body is not a JSON object: tripping all accounts"]
    notes = []
    unknown = sorted(str(k)[:40] for k in doc if k not in TRIP_BODY_KEYS)
    if unknown:
        notes.append(f"unknown keys ignored: {unknown[:10]}")
    raw_reason = doc.get("reason")
    if isinstance(raw_reason, str) and raw_reason.strip():
        reason = raw_reason.strip()[:MAX_REASON_CHARS]
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
    try:
        body = await read_body(request)
    except UnreadableBodyError as exc:
        return await _unreadable(request, exc, "webhook", who, seen)
    reason, accounts, notes = _parse_trip_body(body)
    receipt = request.app[SWITCH_KEY].trip(
        TripRequest(
            source="webhook", reason=reason, accounts=accounts, actor=who,
            notes=tuple(notes), seen_monotonic=seen,
        )
    )  # fmt: skip
    return web.json_response(await _receipt(request, receipt), status=202)


async def _trip_on_alerts(
    request: web.Request,
    body: bytes | UnreadableBodyError,
    match: Mapping[str, str],
    *,
    source: AlertSource,
    who: str,
    seen: float,
) -> web.Response:
    if isinstance(body, UnreadableBodyError):
        return await _unreadable(request, body, source, who, seen)
    try:
        doc = parse_payload(body, source)
    except TriggerError as exc:
        # Fail safe: an authenticated alert we cannot read trips everything.
        receipt = _trip_everything(request, source, who, str(exc), seen)
        return web.json_response({"tripped": True, **await _receipt(request, receipt)})
    trip = firing_trip(doc, match, source, who)
    if trip is None:
        return web.json_response(
            {"tripped": False, "detail": "no matching firing alert"}
        )
    trip = TripRequest(
        source=trip.source, reason=trip.reason, accounts=trip.accounts,
        actor=trip.actor, notes=trip.notes, seen_monotonic=seen,
    )  # fmt: skip
    receipt = request.app[SWITCH_KEY].trip(trip)
    return web.json_response({"tripped": True, **await _receipt(request, receipt)})


async def handle_alertmanager(request: web.Request) -> web.Response:
    """POST /v1/alertmanager: Alertmanager webhook v4."""
    seen = time.monotonic()
    who = authorize(request, "trip")
    if isinstance(who, web.Response):
        return who
    section = request.app[CONFIG_KEY]().triggers.alertmanager
    if section is None:
        return json_error(404, "not_found", "triggers.alertmanager is not configured")
    body = await _body_or_problem(request)
    return await _trip_on_alerts(
        request, body, section.match, source="alertmanager", who=who, seen=seen
    )


def _verify_grafana_signature(
    request: web.Request, grafana: GrafanaConfig, secret: str, body: bytes
) -> str | web.Response:
    """The HMAC actor name when the signature is valid, fresh and first seen."""
    signature = request.headers.get(grafana.hmac_header, "").strip().lower()
    if not signature:
        return json_error(401, "unauthorized", f"missing {grafana.hmac_header}")
    signed = body
    if grafana.timestamp_header is not None:
        stamp = request.headers.get(grafana.timestamp_header, "").strip()
        try:
            sent = float(stamp)
        except ValueError:
            sent = math.nan
        if not math.isfinite(sent):  # "nan" would pass any comparison below
            return json_error(401, "unauthorized", f"bad {grafana.timestamp_header}")
        if abs(time.time() - sent) > GRAFANA_MAX_SKEW_SECONDS:
            return json_error(401, "unauthorized", "timestamp outside 300 s")
        signed = stamp.encode() + b":" + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    # Bytes, not str: compare_digest raises on str with non-ASCII characters.
    given = signature.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(expected.encode(), given):
        return json_error(401, "unauthorized", "bad signature")
    if grafana.timestamp_header is not None and not _first_sighting(request, expected):
        return json_error(401, "unauthorized", "replayed signature")
    return "grafana-hmac"


def _first_sighting(request: web.Request, signature: str) -> bool:
    """Remember signatures for the skew window: one signed request twice is a replay."""
    seen = request.app[REPLAY_GUARD_KEY]
    now = time.monotonic()
    if len(seen) >= REPLAY_GUARD_MAX_ENTRIES:
        for key in [k for k, expiry in seen.items() if expiry < now]:
            del seen[key]
    if signature in seen and seen[signature] >= now:
        return False
    if len(seen) >= REPLAY_GUARD_MAX_ENTRIES:
        return False  # flooded with fresh signatures: refuse rather than grow
    # Twice the skew: a timestamp may be up to the skew in the future or the past.
    seen[signature] = now + 2 * GRAFANA_MAX_SKEW_SECONDS
    return True


async def handle_grafana(request: web.Request) -> web.Response:
    """POST /v1/grafana: Grafana alerting webhook, bearer token or HMAC signature."""
    seen = time.monotonic()
    grafana = request.app[CONFIG_KEY]().triggers.grafana
    who: str | web.Response = json_error(401, "unauthorized", "missing bearer token")
    if _bearer(request) is not None:
        who = authorize(request, "trip")
    if grafana is None:
        if isinstance(who, web.Response):
            return who
        return json_error(404, "not_found", "triggers.grafana is not configured")
    body: bytes | UnreadableBodyError
    if isinstance(who, web.Response):
        secret = grafana.hmac_secret
        if secret is None:
            return who
        body = await _body_or_problem(request)
        if isinstance(body, UnreadableBodyError):  # no body, no signature to check
            return json_error(body.status, body.code, body.detail)
        who = _verify_grafana_signature(request, grafana, secret, body)
        if isinstance(who, web.Response):
            return who
    else:
        body = await _body_or_problem(request)
    return await _trip_on_alerts(
        request, body, grafana.match, source="grafana", who=who, seen=seen
    )
