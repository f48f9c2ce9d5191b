"""CancelLines: one warm connection per account, its cancel-all already serialized.

The first attempt of a sweep is a single `transport.write` made synchronously
inside `Switch.trip()`: no request building, no pool look-up, no loop
iteration between the trigger and the wire. Anything unusual (line not
connected, busy, closed, a response h11 cannot parse) makes `fire()` return
None or the attempt fail as a network error, and the caller falls back to the
aiohttp session and its retries. Lines are opened at start-up and re-opened
whenever they close, so DNS and TLS happen then, never at trip time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import h11
import structlog
from yarl import URL

from killswitch.config import AccountConfig, EmsConfig

log = structlog.get_logger()

MAX_BODY_BYTES = 256 * 1024
RECONNECT_MIN_SECONDS = 0.2
RECONNECT_MAX_SECONDS = 5.0

Response = tuple[int, Mapping[str, str], bytes]


@dataclass(frozen=True, slots=True)
class LineSpec:
    """Where one account's line connects and the request it holds ready."""

    exchange_id: str
    host: str
    port: int
    use_tls: bool
    request: h11.Request
    body: bytes
    timeout_seconds: float


def line_spec(
    account: AccountConfig, ems: EmsConfig, target: str, body: bytes
) -> LineSpec:
    """The line for `account`: POST `target` on its EMS with `body`."""
    url = URL(ems.base_url)
    assert url.host is not None  # the config loader insists on http(s)://host
    default_port = 443 if url.scheme == "https" else 80
    port = url.port or default_port
    host_header = url.host if port == default_port else f"{url.host}:{port}"
    headers = [
        ("Host", host_header),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    if ems.api_key is not None:
        headers.append(("X-CoinAPI-Key", ems.api_key))
    return LineSpec(
        exchange_id=account.exchange_id,
        host=url.host,
        port=port,
        use_tls=url.scheme == "https",
        request=h11.Request(method="POST", target=target, headers=headers),
        body=body,
        timeout_seconds=ems.timeout_seconds,
    )


class Fired:
    """A cancel-all already written on a line; await `response`."""

    __slots__ = ("_line", "answered_monotonic", "response", "written_monotonic")

    def __init__(self, line: _Line, response: asyncio.Future[Response]) -> None:
        self._line = line
        self.response = response
        self.written_monotonic = time.monotonic()
        self.answered_monotonic = 0.0  # set when the whole answer has been read

    def abandon(self) -> None:
        """The caller gave up (timeout, shutdown): the line cannot be reused."""
        self._line.abort()


class _Line(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection dedicated to one account's cancel-all."""

    def __init__(self, spec: LineSpec, on_closed: asyncio.Event) -> None:
        self.spec = spec
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._h11 = h11.Connection(h11.CLIENT)
        self._wire: bytes | None = None  # the next request, serialized ahead
        self._pending: asyncio.Future[Response] | None = None
        self._fired: Fired | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self.is_ready = False
        self.is_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._prepare()
        self.is_ready = True

    def _prepare(self) -> None:
        """Serialize the next request ahead of time, off the hot path."""
        if self._wire is not None or self._pending is not None or self.is_closed:
            return  # prepared already, or a request is in flight (h11 is mid-cycle)
        spec = self.spec
        self._wire = (
            self._h11.send(spec.request)
            + self._h11.send(h11.Data(data=spec.body))
            + self._h11.send(h11.EndOfMessage())
        )

    def fire(self) -> Fired | None:
        """Write the prepared cancel-all; None when the line cannot take it now."""
        if not self.is_ready or self._transport is None or self._transport.is_closing():
            return None
        self.is_ready = False
        self._prepare()  # normally done already, right after the last answer
        assert self._wire is not None
        self._pending = asyncio.get_running_loop().create_future()
        self._status, self._headers, self._body = 0, {}, bytearray()
        self._transport.write(self._wire)
        self._wire = None
        self._fired = Fired(self, self._pending)
        return self._fired

    def data_received(self, data: bytes) -> None:
        if self._pending is None:
            self.abort()  # the server spoke unasked: this line is not trustworthy
            return
        try:
            self._h11.receive_data(data)
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Response):
                    self._status = event.status_code
                    self._headers = {
                        k.decode("latin-1").title(): v.decode("latin-1")
                        for k, v in event.headers
                    }
                elif isinstance(event, h11.Data):
                    if len(self._body) < MAX_BODY_BYTES:
                        self._body += event.data[: MAX_BODY_BYTES - len(self._body)]
                elif isinstance(event, h11.EndOfMessage):
                    self._complete()
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self.abort()
                    return
        except h11.RemoteProtocolError as exc:
            self._fail(ConnectionError(f"unparsable response: {exc}"))
            self.abort()

    def _complete(self) -> None:
        pending, self._pending = self._pending, None
        if self._fired is not None:
            self._fired.answered_monotonic = time.monotonic()
            self._fired = None
        if pending is not None and not pending.done():
            pending.set_result((self._status, self._headers, bytes(self._body)))
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self.is_ready = True
            # Not urgent: other accounts' answers may be waiting to be read.
            asyncio.get_running_loop().call_soon(self._prepare)
        else:
            self.abort()  # the server wants to close: reconnect instead

    def _fail(self, exc: Exception) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_ready = False
        self.is_closed = True
        self._fail(ConnectionResetError(f"connection lost: {exc or 'closed by peer'}"))
        self._on_closed.set()

    def abort(self) -> None:
        """Drop the connection now; the manager opens a new one."""
        self.is_ready = False
        if self._transport is not None:
            self._transport.abort()


class CancelLines:
    """Keeps one line per account open; re-opens closed ones with backoff."""

    def __init__(self, specs: Mapping[str, LineSpec]) -> None:
        self._specs = dict(specs)
        self._lines: dict[str, _Line] = {}
        self._changed = asyncio.Event()
        self._tg = asyncio.TaskGroup()
        self._tls = ssl.create_default_context()
        self._keeper: asyncio.Task[None] | None = None

    def fire(self, exchange_id: str) -> Fired | None:
        """Write `exchange_id`'s cancel-all if its line is ready, else None."""
        line = self._lines.get(exchange_id)
        return line.fire() if line is not None else None

    @property
    def ready_count(self) -> int:
        """How many lines could fire right now."""
        return sum(1 for line in self._lines.values() if line.is_ready)

    def configure(self, specs: Mapping[str, LineSpec]) -> None:
        """Use new specs (after a reload): changed lines re-open, removed ones close."""
        for exchange_id, line in list(self._lines.items()):
            if specs.get(exchange_id) != line.spec:
                line.abort()
                del self._lines[exchange_id]
        self._specs = dict(specs)
        self._changed.set()

    async def __aenter__(self) -> CancelLines:
        await self._tg.__aenter__()
        self._keeper = self._tg.create_task(self._keep_open(), name="lines.keep_open")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._keeper is not None:
            self._keeper.cancel()  # it waits for closed lines forever otherwise
        await self._tg.__aexit__(exc_type, exc, tb)

    async def _keep_open(self) -> None:
        try:
            backoff = RECONNECT_MIN_SECONDS
            while True:
                self._changed.clear()
                missing = [
                    spec
                    for exchange_id, spec in self._specs.items()
                    if exchange_id not in self._lines
                    or self._lines[exchange_id].is_closed
                ]
                if missing:
                    results = await asyncio.gather(*(self._open(s) for s in missing))
                    backoff = (
                        RECONNECT_MIN_SECONDS
                        if all(results)
                        else min(backoff * 2, RECONNECT_MAX_SECONDS)
                    )
                    if not all(results):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(backoff):
                                await self._changed.wait()
                        continue
                await self._changed.wait()
        finally:
            for line in self._lines.values():
                line.abort()

    async def _open(self, spec: LineSpec) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(spec.timeout_seconds):
                _, line = await loop.create_connection(
                    lambda: _Line(spec, self._changed),
                    spec.host,
                    spec.port,
                    ssl=self._tls if spec.use_tls else None,
                    server_hostname=spec.host if spec.use_tls else None,
                )
        except (OSError, TimeoutError) as exc:
            log.debug(
                "cancel_line_unavailable", account=spec.exchange_id, error=str(exc)
            )
            return False
        if self._specs.get(spec.exchange_id) != spec:
            line.abort()  # reconfigured while connecting
            return True
        self._lines[spec.exchange_id] = line
        return True
