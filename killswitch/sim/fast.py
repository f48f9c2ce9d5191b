"""The simulator's front door: answers plain cancel-alls and order lists itself.

aiohttp's server costs the simulator ~100 µs of one core per request, and a burst
of N cancel-alls is read one after the other, so at N = 32 the simulator alone
added ~10 % to a 50 ms latency and benchmarks measured the simulator instead of
the client. `FastFront` is the protocol of every accepted connection. It parses
each request itself and answers on the spot (or after the injected latency) when
the request is plain:

- `POST /v1/orders/cancel/all` with a JSON object naming a non-empty `exchange_id`
  (`Content-Type: application/json`, a `Content-Length` body), or
  `GET /v1/orders?exchange_id=X`;
- HTTP/1.1, keep-alive, no `Transfer-Encoding`, no `Expect`;
- the right `X-CoinAPI-Key` (when one is required), and no scripted failure and
  no standing fault on that account when the request arrives.

Such a request is recorded, delayed, answered and logged exactly as the aiohttp
app would (same status, headers and body). Anything else hands the connection, with
the bytes not yet answered, to aiohttp's `RequestHandler` for good (the transport
switches protocols), so errors, faults, control paths and odd clients get the
full app. A connection never has two requests in flight on the fast path: a
pipelined request waits for the answer before it is looked at.

One difference: the fast path decides on faults when the request arrives, while
the app applies a fault scripted during the latency; script faults before the
request.
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Final

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy

from killswitch.sim.simulator import RecordedRequest, Simulator

_CANCEL_ALL: Final = b"/v1/orders/cancel/all"
_ORDERS: Final = b"/v1/orders"
_ORDERS_QUERY: Final = b"/v1/orders?"
_ACCEPTED_MESSAGE: Final = "Cancel all request accepted."
_MAX_HEAD_BYTES: Final = 16 * 1024
_MAX_BODY_BYTES: Final = 64 * 1024
_SAFE_QUERY_BYTES: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/-_.~:%+"
)
#: aiohttp's server closes a connection idle this long; so does the fast path.
_KEEPALIVE_SECONDS: Final = 75.0


class _Date:
    """The `Date` header value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


_DATE: Final = _Date()
_HEAD_TEMPLATE: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Date: %s\r\n"
    b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n\r\n"
)


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class FastFront(asyncio.Protocol):
    """Serves plain EMS requests itself; hands everything else to aiohttp."""

    def __init__(
        self,
        sim: Simulator,
        handler_factory: Callable[[], asyncio.Protocol],
        connections: set[FastFront],
    ) -> None:
        self._sim = sim
        self._handler_factory = handler_factory
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take the connection; requests are served as they arrive."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.add(self)
        self._idle_from_now()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and drop an answer still waiting for its latency."""
        # A client that leaves during the latency leaves its orders open, as in
        # the app, whose handler is cancelled on disconnect.
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._stop_idle()
        self._transport = None
        self._connections.discard(self)

    def _idle_from_now(self) -> None:
        self._stop_idle()
        self._idle = asyncio.get_running_loop().call_later(
            _KEEPALIVE_SECONDS, self.close
        )

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def eof_received(self) -> bool:
        """Close on EOF."""
        return False  # close: no half-open connections, as in aiohttp

    def close(self) -> None:
        """Close the connection (server shutdown); a pending answer is dropped."""
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        """Serve every complete plain request; hand off at the first other one."""
        self._buffer += data
        self._serve_buffer()

    def _serve_buffer(self) -> None:
        while self._pending is None and self._transport is not None:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self._buffer) > _MAX_HEAD_BYTES:
                    self._hand_off()
                return
            request = self._parse(head_end)
            if request is None:
                self._hand_off()
                return
            if request is _INCOMPLETE:
                return
            self._accept(request)

    def _parse(self, head_end: int) -> _Plain | None:
        """The plain request at the start of the buffer; None: not a plain one."""
        head = bytes(self._buffer[:head_end])
        request_line, *header_lines = head.split(b"\r\n")
        method, _, rest = request_line.partition(b" ")
        target, _, version = rest.partition(b" ")
        if version != b"HTTP/1.1":
            return None
        headers: list[tuple[str, str]] = []
        length = 0
        media = b""
        api_key: str | None = None
        for line in header_lines:
            name, colon, raw_value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return None
            lower = name.lower()
            value = raw_value.strip()
            if lower in {b"transfer-encoding", b"expect", b"upgrade"}:
                return None
            if lower == b"connection" and value.lower() != b"keep-alive":
                return None
            if lower == b"content-length":
                if not value.isdigit() or length:
                    return None
                length = int(value)
            elif lower == b"content-type":
                media = value.partition(b";")[0].strip().lower()
            text = value.decode("utf-8", "surrogateescape")
            if lower == b"x-coinapi-key":
                api_key = text
            headers.append((name.decode("utf-8", "surrogateescape"), text))
        if length > _MAX_BODY_BYTES:
            return None
        end = head_end + 4 + length
        if len(self._buffer) < end:
            return _INCOMPLETE
        body = bytes(self._buffer[head_end + 4 : end])
        if method == b"POST" and target == _CANCEL_ALL:
            exchange_id = _cancel_all_account(media, body)
            path = _CANCEL_ALL.decode()
        elif method == b"GET" and target.startswith(_ORDERS_QUERY) and not length:
            exchange_id = _orders_account(target[len(_ORDERS_QUERY) :])
            path = _ORDERS.decode()
        else:
            return None
        if exchange_id is None or not self._is_plain(exchange_id, api_key):
            return None
        return _Plain(
            end=end,
            method=method.decode(),
            path=path,
            exchange_id=exchange_id,
            headers=headers,
            body=body,
        )

    def _is_plain(self, exchange_id: str, api_key: str | None) -> bool:
        sim = self._sim
        if sim.api_key is not None and (
            api_key is None
            or not hmac.compare_digest(api_key.encode(), sim.api_key.encode())
        ):
            return False
        return sim.faults.is_plain(exchange_id)

    def _accept(self, request: _Plain) -> None:
        sim = self._sim
        received = sim.clock()
        self._stop_idle()
        del self._buffer[: request.end]
        sim.record(
            RecordedRequest(
                method=request.method,
                path=request.path,
                exchange_id=request.exchange_id,
                received_monotonic=received,
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                body=request.body,
            )
        )
        delay = sim.faults.delay_seconds(request.exchange_id)
        if delay > 0:
            self._pending = asyncio.get_running_loop().call_later(
                delay, self._answer, request
            )
        else:
            self._answer(request)

    def _answer(self, request: _Plain) -> None:
        self._pending = None
        if self._transport is None or self._transport.is_closing():
            return
        book = self._sim.book
        if request.method == "POST":
            book.cancel_all(request.exchange_id)
            body = _dumps(
                {"exchange_id": request.exchange_id, "message": _ACCEPTED_MESSAGE}
            )
        else:
            body = _dumps(book.open_orders(request.exchange_id))
        self._transport.write(_HEAD_TEMPLATE % (len(body), _DATE.value()) + body)
        self._idle_from_now()
        if self._buffer:
            self._serve_buffer()  # a pipelined request waited for this answer

    def _hand_off(self) -> None:
        """Give the connection, and the bytes not yet served, to aiohttp for good."""
        transport = self._transport
        assert transport is not None
        self._transport = None  # inert from now on: the transport calls aiohttp
        self._stop_idle()
        self._connections.discard(self)
        handler = self._handler_factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            handler.data_received(data)


class _Plain:
    """One request the fast path answers."""

    __slots__ = ("body", "end", "exchange_id", "headers", "method", "path")

    def __init__(
        self,
        *,
        end: int,
        method: str,
        path: str,
        exchange_id: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        self.end = end
        self.method = method
        self.path = path
        self.exchange_id = exchange_id
        self.headers = headers
        self.body = body


_INCOMPLETE: Final = _Plain(
    end=0, method="", path="", exchange_id="", headers=[], body=b""
)


def _cancel_all_account(media: bytes, body: bytes) -> str | None:
    """The account a plain cancel-all body names; None for anything else."""
    if media != b"application/json":
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    exchange_id = document.get("exchange_id")
    return exchange_id if isinstance(exchange_id, str) and exchange_id else None


def _orders_account(query: bytes) -> str | None:
    """The account of a `exchange_id=X` query; None for anything else."""
    if not query.startswith(b"exchange_id=") or not set(query) <= _SAFE_QUERY_BYTES:
        return None
    pairs = urllib.parse.parse_qsl(query.decode("ascii"), keep_blank_values=True)
    if len(pairs) != 1 or not pairs[0][1]:
        return None
    return pairs[0][1]


async def serve_fast(
    sim: Simulator, runner: web.AppRunner, host: str, port: int
) -> tuple[asyncio.Server, set[FastFront]]:
    """Listen on `host:port` with `FastFront` in front of `runner`'s aiohttp server.

    Raises:
        OSError: the address cannot be bound.
    """
    server = runner.server
    assert server is not None  # runner.setup() has run
    connections: set[FastFront] = set()
    listener = await asyncio.get_running_loop().create_server(
        lambda: FastFront(sim, server, connections), host, port, backlog=1024
    )
    return listener, connections
