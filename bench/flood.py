"""A bounded flood of unauthenticated trip requests, run as its own process.

    python bench/flood.py --port P --rate 500 --seconds 10

Sends `POST /v1/trip` without a token (the daemon answers 401) at a fixed rate
over a few keep-alive connections to 127.0.0.1 only. Prints `{"ready": true}` once
connected, then, at the end, one JSON line: how many were sent and answered, by
status, and the achieved rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

from rawhttp import _Parser, build_request, require

HOST = "127.0.0.1"  # loopback only, whatever the caller says


class _Conn(asyncio.Protocol):
    def __init__(self, statuses: Counter[int]) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = _Parser()
        self.in_flight = 0
        self.statuses = statuses
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        require(
            isinstance(transport, asyncio.Transport),
            "isinstance(transport, asyncio.Transport)",
        )
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.buffer += data
        while (answer := self.parser.take()) is not None:
            self.statuses[answer[0]] += 1
            self.in_flight -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


async def flood(port: int, rate: float, seconds: float, connections: int) -> dict:
    loop = asyncio.get_running_loop()
    statuses: Counter[int] = Counter()
    body = json.dumps({"reason": "not a token in sight"}).encode()
    request = build_request(
        "POST",
        "/v1/trip",
        f"{HOST}:{port}",
        body=body,
        headers={"Content-Type": "application/json"},
    )

    async def open_one() -> _Conn:
        _, conn = await loop.create_connection(lambda: _Conn(statuses), HOST, port)
        return conn

    conns = [await open_one() for _ in range(connections)]
    print(json.dumps({"ready": True}), flush=True)
    total = int(rate * seconds)
    sent = reopened = skipped = 0
    started = time.monotonic()
    next_conn = 0
    while sent + skipped < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        while sent + skipped < due:
            conn = conns[next_conn % len(conns)]
            next_conn += 1
            if conn.closed:
                conns[conns.index(conn)] = conn = await open_one()
                reopened += 1
            if conn.in_flight > 4:  # the daemon is not keeping up: do not pile on
                skipped += 1
                continue
            require(conn.transport is not None, "conn.transport is not None")
            conn.transport.write(request)
            conn.in_flight += 1
            sent += 1
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - started
    drain_until = time.monotonic() + 2.0
    while sum(statuses.values()) < sent and time.monotonic() < drain_until:
        await asyncio.sleep(0.01)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "sent": sent,
        "skipped": skipped,
        "answered": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(elapsed, 3),
        "rate": round(sent / elapsed, 1) if elapsed else 0.0,
        "reopened": reopened,
        "started_monotonic": started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if not (0 < args.rate <= 5000 and 0 < args.seconds <= 60):
        parser.error("--rate must be in (0, 5000] and --seconds in (0, 60]")
    result = asyncio.run(flood(args.port, args.rate, args.seconds, args.connections))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
