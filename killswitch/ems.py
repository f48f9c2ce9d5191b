"""EmsClient: one attempt per call to the CoinAPI EMS REST API; classifies responses.

Everything a request needs (URL, body, headers, timeout) is prepared once per
account, so the cancel path only writes bytes to a warm pooled connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.connector import Connection
from yarl import URL

from killswitch.config import AccountConfig, EmsConfig
from killswitch.errors import EmsRejectedError, EmsUnavailableError
from killswitch.line import CancelLines, Fired, LineSpec, line_spec

CANCEL_ALL_PATH = "/v1/orders/cancel/all"
ORDERS_PATH = "/v1/orders"
# Terminal statuses per the spec's OrdStatus; every other status is still open.
TERMINAL_STATUSES = frozenset({"FILLED", "CANCELED", "REJECTED"})
RETRYABLE_REJECTS = frozenset({"EXCHANGE_RESPONSE_TIMEOUT", "EXCHANGE_UNREACHABLE"})
# Bodies are hints (a kill switch never needs more); a huge body is cut off here.
MAX_BODY_BYTES = 256 * 1024
STATUS_EXCHANGE_UNREACHABLE = 490  # CoinAPI's own code


class WireStamp:
    """Filled in when a request's body has been written to its socket."""

    __slots__ = ("written_monotonic",)

    def __init__(self) -> None:
        self.written_monotonic: float | None = None


# The stamp of the request being sent from the current task. The body-writing
# task aiohttp starts copies this context, so it finds the right stamp.
_current_stamp: ContextVar[WireStamp | None] = ContextVar("wire_stamp", default=None)


class _StampingRequest(aiohttp.ClientRequest):
    """Records when the body is on the wire; cheaper than client tracing."""

    async def write_bytes(
        self,
        writer: AbstractStreamWriter,
        conn: Connection,
        content_length: int | None = None,
    ) -> None:
        await super().write_bytes(writer, conn, content_length)
        stamp = _current_stamp.get()
        if stamp is not None and stamp.written_monotonic is None:
            stamp.written_monotonic = time.monotonic()


def create_session(accounts: int, timeout_seconds: float) -> aiohttp.ClientSession:
    """The daemon's one HTTP client session: warm pool, no cookies, wire stamps."""
    return aiohttp.ClientSession(
        connector=connector_for(accounts),
        timeout=aiohttp.ClientTimeout(total=timeout_seconds),
        request_class=_StampingRequest,
        # The EMS sets no cookies; skipping the jar saves work on every request.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def connector_for(accounts: int) -> aiohttp.TCPConnector:
    """A pool sized for one connection per account, kept warm, resolving DNS once."""
    return aiohttp.TCPConnector(
        limit=max(100, 2 * accounts),
        limit_per_host=0,
        # Longer than the keep-warm interval, so probes keep the pool alive.
        keepalive_timeout=60.0,
        # A trip must never wait on DNS: addresses resolved at warm-up are kept.
        ttl_dns_cache=None,
    )


@dataclass(frozen=True, slots=True)
class CancelAck:
    """A cancel-all the EMS accepted (a hint only: verification is the truth)."""

    exchange_id: str
    status: int
    message: str | None


@dataclass(frozen=True, slots=True)
class _Prepared:
    cancel_url: URL
    cancel_body: bytes
    orders_url: URL
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout
    timeout_seconds: float


class EmsClient:
    """Cancel-all and open-orders calls for the configured accounts; no retries here."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ems: Mapping[str, EmsConfig],
        accounts: tuple[AccountConfig, ...],
        lines: CancelLines | None = None,
    ) -> None:
        self._session = session
        self._lines = lines
        self._prepared: dict[str, _Prepared] = {}
        for account in accounts:
            cfg = ems[account.ems]
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if cfg.api_key is not None:
                headers["X-CoinAPI-Key"] = cfg.api_key
            self._prepared[account.exchange_id] = _Prepared(
                cancel_url=URL(cfg.base_url + CANCEL_ALL_PATH),
                cancel_body=cancel_all_body(account.exchange_id),
                orders_url=URL(cfg.base_url + ORDERS_PATH).with_query(
                    exchange_id=account.exchange_id
                ),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=cfg.timeout_seconds),
                timeout_seconds=cfg.timeout_seconds,
            )

    def _timeout(
        self, p: _Prepared, limit_seconds: float | None
    ) -> aiohttp.ClientTimeout:
        if limit_seconds is None or limit_seconds >= p.timeout_seconds:
            return p.timeout
        return aiohttp.ClientTimeout(total=max(limit_seconds, 0.001))

    def fire(self, exchange_id: str) -> Fired | None:
        """Write the prepared cancel-all on the account's warm line, if one is ready."""
        return self._lines.fire(exchange_id) if self._lines is not None else None

    async def cancel_all(
        self,
        exchange_id: str,
        *,
        fired: Fired | None = None,
        stamp: WireStamp | None = None,
        limit_seconds: float | None = None,
    ) -> CancelAck:
        """POST /v1/orders/cancel/all for one account, once (or await one `fired`).

        Raises:
            EmsUnavailableError: transient failure; worth retrying.
            EmsRejectedError: the EMS refused; retrying will not help
                (except reject reason OTHER, which callers may retry a little).
        """
        p = self._prepared[exchange_id]
        if fired is not None:
            if stamp is not None:
                stamp.written_monotonic = fired.written_monotonic
            status, headers, body = await self._await_fired(
                fired,
                exchange_id,
                min(p.timeout_seconds, limit_seconds or p.timeout_seconds),
            )
        else:
            status, headers, body = await self._send(
                "POST",
                p.cancel_url,
                exchange_id,
                p,
                limit_seconds,
                data=p.cancel_body,
                stamp=stamp,
            )
        doc = classify(exchange_id, "cancel_all", status, headers, body)
        message = doc.get("message") if isinstance(doc, dict) else None
        return CancelAck(
            exchange_id, status, message if isinstance(message, str) else None
        )

    async def open_orders(
        self, exchange_id: str, *, limit_seconds: float | None = None
    ) -> list[dict[str, Any]]:
        """GET /v1/orders?exchange_id=... and return the orders that are still open.

        Raises:
            EmsUnavailableError: transient failure or a body that is not a list.
            EmsRejectedError: the EMS refused.
        """
        p = self._prepared[exchange_id]
        status, headers, body = await self._send(
            "GET", p.orders_url, exchange_id, p, limit_seconds
        )
        doc = classify(exchange_id, "open_orders", status, headers, body)
        if not isinstance(doc, list) or not all(isinstance(o, dict) for o in doc):
            msg = (
                f"{exchange_id}: open_orders answered {status} without a list of orders"
            )
            raise EmsUnavailableError(
                msg, exchange_id=exchange_id, outcome="bad_response"
            )
        return [o for o in doc if o.get("status") not in TERMINAL_STATUSES]

    async def probe(self, exchange_id: str) -> None:
        """A read-only documented call that keeps a pooled connection warm.

        Raises:
            EmsUnavailableError: the EMS did not answer usefully.
        """
        p = self._prepared[exchange_id]
        status, _, _ = await self._send("GET", p.orders_url, exchange_id, p, None)
        if status >= 500 and status != STATUS_EXCHANGE_UNREACHABLE:
            msg = f"{exchange_id}: probe answered {status}"
            raise EmsUnavailableError(
                msg, exchange_id=exchange_id, outcome="http_error"
            )

    @staticmethod
    async def _await_fired(
        fired: Fired, exchange_id: str, timeout_seconds: float
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            async with asyncio.timeout(timeout_seconds):
                return await fired.response
        except TimeoutError as exc:
            fired.abandon()
            msg = f"{exchange_id}: cancel_all timed out"
            raise EmsUnavailableError(
                msg, exchange_id=exchange_id, outcome="timeout"
            ) from exc
        except ConnectionError as exc:
            msg = f"{exchange_id}: cancel_all failed: {type(exc).__name__}: {exc}"
            raise EmsUnavailableError(
                msg, exchange_id=exchange_id, outcome="network_error"
            ) from exc
        except asyncio.CancelledError:
            fired.abandon()
            raise

    async def _send(
        self,
        method: str,
        url: URL,
        exchange_id: str,
        p: _Prepared,
        limit_seconds: float | None,
        *,
        data: bytes | None = None,
        stamp: WireStamp | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        what = "cancel_all" if data is not None else "open_orders"
        _current_stamp.set(stamp)
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                headers=p.headers,
                timeout=self._timeout(p, limit_seconds),
            ) as resp:
                body = await resp.content.read(MAX_BODY_BYTES)
                return resp.status, resp.headers, body
        except TimeoutError as exc:
            msg = f"{exchange_id}: {what} timed out"
            raise EmsUnavailableError(
                msg, exchange_id=exchange_id, outcome="timeout"
            ) from exc
        except aiohttp.ClientError as exc:
            msg = f"{exchange_id}: {what} failed: {type(exc).__name__}: {exc}"
            raise EmsUnavailableError(
                msg, exchange_id=exchange_id, outcome="network_error"
            ) from exc


def cancel_all_body(exchange_id: str) -> bytes:
    """The spec's OrderCancelAllRequest: `exchange_id` is the only field."""
    return json.dumps({"exchange_id": exchange_id}).encode()


def line_specs(
    ems: Mapping[str, EmsConfig], accounts: tuple[AccountConfig, ...]
) -> dict[str, LineSpec]:
    """One warm-line spec per account: its cancel-all, ready to write."""
    return {
        a.exchange_id: line_spec(
            a,
            ems[a.ems],
            URL(ems[a.ems].base_url).path.rstrip("/") + CANCEL_ALL_PATH,
            cancel_all_body(a.exchange_id),
        )
        for a in accounts
    }


def _parse_json(body: bytes) -> Any:
    # Parse whatever the Content-Type says: the spec itself writes `appliction/json`.
    try:
        return json.loads(body)
    except ValueError:
        return None


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date: our own backoff applies
    return max(seconds, 0.0)


def classify(
    exchange_id: str, what: str, status: int, headers: Mapping[str, str], body: bytes
) -> Any:
    """Return the parsed body of a successful answer, or raise per SPEC's table.

    Raises:
        EmsUnavailableError: 490, EXCHANGE_UNREACHABLE/EXCHANGE_RESPONSE_TIMEOUT
            rejects (any status), 5xx, 429 and unexpected codes.
        EmsRejectedError: 400, 401/403, other 4xx and the other reject reasons.
    """
    doc = _parse_json(body)
    reason = None
    if isinstance(doc, dict) and doc.get("type") == "MESSAGE_REJECT":
        raw_reason = doc.get("reject_reason")
        reason = str(raw_reason) if raw_reason else None
    detail = doc.get("message") if isinstance(doc, dict) else None
    where = f"{exchange_id}: {what} answered {status}"
    if reason is not None:
        where += f" reject {reason}"
    if isinstance(detail, str) and detail:
        where += f": {detail[:200]}"

    if status == STATUS_EXCHANGE_UNREACHABLE or reason in RETRYABLE_REJECTS:
        raise EmsUnavailableError(
            where, exchange_id=exchange_id, outcome="retryable_reject"
        )
    if status in (401, 403):
        raise EmsRejectedError(
            where, exchange_id=exchange_id, outcome="auth_error", reject_reason=reason
        )
    if status == 429 or status >= 500:
        raise EmsUnavailableError(
            where,
            exchange_id=exchange_id,
            outcome="http_error",
            retry_after_seconds=_retry_after_seconds(headers),
        )
    if 400 <= status < 500 or reason is not None:
        raise EmsRejectedError(
            where, exchange_id=exchange_id, outcome="rejected", reject_reason=reason
        )
    if not 200 <= status < 300:
        raise EmsUnavailableError(where, exchange_id=exchange_id, outcome="http_error")
    return doc


__all__ = [
    "CancelAck",
    "EmsClient",
    "WireStamp",
    "classify",
    "connector_for",
    "create_session",
    "line_specs",
]
