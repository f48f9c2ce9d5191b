"""Minimal HTTP/1.1 keep-alive clients on raw sockets: nothing between us and the wire.

Used to send triggers (the request bytes are serialized before the clock starts) and
as the simulator's reference client (a burst of N pre-serialized cancel-alls).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any


def require(condition: object, what: str) -> None:
    """Fail loudly when something this script relies on does not hold."""
    if not condition:
        msg = f"bench: expected {what}"
        raise RuntimeError(msg)


def build_request(
    method: str,
    path: str,
    host: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Serialize one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in {"POST", "PUT"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def cancel_all_request(host: str, exchange_id: str, api_key: str | None) -> bytes:
    """The cancel-all request a client of the EMS sends for one account."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key is not None:
        headers["X-CoinAPI-Key"] = api_key
    body = json.dumps({"exchange_id": exchange_id}).encode()
    return build_request(
        "POST", "/v1/orders/cancel/all", host, body=body, headers=headers
    )


class _Parser:
    """Incremental parser for one response at a time (Content-Length bodies only)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def take(self) -> tuple[int, bytes] | None:
        """A complete (status, body) from the buffer, or None when more is needed."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        length = 0
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "transfer-encoding":
                msg = f"chunked responses are not supported: {status_line}"
                raise ValueError(msg)
        total = end + 4 + length
        if len(self.buffer) < total:
            return None
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        return int(status_line.split(" ", 2)[1]), body


class SyncClient:
    """One blocking keep-alive connection (re-opened if the server closed it)."""

    def __init__(self, host: str, port: int, timeout_seconds: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout_seconds = timeout_seconds
        self._sock: socket.socket | None = None
        self._parser = _Parser()

    def connect(self) -> None:
        """Open the connection now (off the clock)."""
        self.close()
        sock = socket.create_connection((self.host, self.port), self.timeout_seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._parser = _Parser()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, request: bytes) -> float:
        """Write `request`; returns time.monotonic() taken just before the write."""
        if self._sock is None:
            self.connect()
        require(self._sock is not None, "self._sock is not None")
        sent = time.monotonic()
        self._sock.sendall(request)
        return sent

    def receive(self) -> tuple[int, bytes]:
        """Block until one whole response is read."""
        require(self._sock is not None, "self._sock is not None")
        while (done := self._parser.take()) is None:
            chunk = self._sock.recv(65536)
            if not chunk:
                self.close()
                msg = f"{self.host}:{self.port} closed the connection"
                raise ConnectionError(msg)
            self._parser.buffer += chunk
        return done

    def call(self, request: bytes) -> tuple[int, Any]:
        """Send and receive one request on the open (or a new) connection."""
        try:
            self.send(request)
            status, body = self.receive()
        except (ConnectionError, OSError):
            self.connect()  # keep-alive closed under us: once more on a fresh one
            self.send(request)
            status, body = self.receive()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode("utf-8", "replace")


class _BurstProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = _Parser()
        self.done: asyncio.Future[float] | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        require(
            isinstance(transport, asyncio.Transport),
            "isinstance(transport, asyncio.Transport)",
        )
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.buffer += data
        answer = self.parser.take()
        if answer is not None and self.done is not None and not self.done.done():
            self.status = answer[0]
            self.done.set_result(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


async def burst(
    host: str, port: int, requests: list[bytes], reps: int, between: Any
) -> list[float]:
    """Fire all `requests` at once on pre-opened connections, `reps` times.

    `between` is an awaitable factory run between repetitions (e.g. a simulator
    reset). Returns, per repetition, the seconds from just before the first write
    to the moment the last response was complete.
    """
    loop = asyncio.get_running_loop()
    protocols: list[_BurstProtocol] = []
    for _ in requests:
        transport, proto = await loop.create_connection(_BurstProtocol, host, port)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocols.append(proto)
    timings: list[float] = []
    try:
        for _ in range(reps):
            await between()
            for proto in protocols:
                proto.done = loop.create_future()
            started = time.monotonic()
            for proto, request in zip(protocols, requests, strict=True):
                require(proto.transport is not None, "proto.transport is not None")
                proto.transport.write(request)
            async with asyncio.timeout(10):
                finished = await asyncio.gather(*(p.done for p in protocols if p.done))
            bad = [p.status for p in protocols if p.status != 200]
            if bad:
                msg = f"burst: non-200 answers {bad[:5]}"
                raise RuntimeError(msg)
            timings.append(max(finished) - started)
    finally:
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.close()
    return timings
