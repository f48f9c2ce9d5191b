"""Abuse of the real daemon's API on loopback: a valid trip still gets through."""

from __future__ import annotations

import asyncio
import collections
import resource
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest

from tests.conftest import ACCOUNTS, RunningSim
from tests.faults.conftest import (
    ONCALL_TOKEN,
    TRIP_TOKEN,
    Daemons,
    alive,
    cancels,
    get_status,
    post,
    proc_fd_count,
    raise_fd_limit,
    wait_until,
)
from tests.processes import DaemonProcess

CONNECTIONS = 1000
IDLE = 100
PARTIAL = 100
BAD_TOKENS = 2000
BIG_HEADERS = 20
BIG_BODIES = 20
FD_HEADROOM = 1000  # both processes hold every abusive connection, plus their own
PHASE_SECONDS = 40.0
FD_LIMIT = 128  # the daemon's, lowered so a few idle sockets reach it


def _host_port(daemon: DaemonProcess) -> tuple[str, int]:
    host, _, port = daemon.api.removeprefix("http://").rpartition(":")
    return host, int(port)


@contextmanager
def _enough_fds() -> Iterator[None]:
    needed = CONNECTIONS + IDLE + PARTIAL + FD_HEADROOM
    if raise_fd_limit(needed) < needed:
        pytest.skip(f"RLIMIT_NOFILE cannot be raised to {needed} for this test")
    yield


async def _status_line(
    daemon: DaemonProcess, request: bytes, timeout_seconds: float = 10.0
) -> bytes:
    """Send raw bytes; the status line answered (b"" when the server hung up)."""
    host, port = _host_port(daemon)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(timeout_seconds):
            try:
                writer.write(request)
                await writer.drain()
            except ConnectionError:
                pass  # it may refuse before reading all we send; read its answer
            try:
                return await reader.readline()
            except ConnectionError:
                return b""
    finally:
        writer.close()


class Abuser:
    """Every kind of abuse at once, each bounded, all released together."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.host, self.port = _host_port(daemon)
        self.writers: list[asyncio.StreamWriter] = []
        self.held_statuses: collections.Counter[bytes] = collections.Counter()
        self.flood: collections.Counter[int] = collections.Counter()
        self.big_headers: collections.Counter[bytes] = collections.Counter()
        self.big_bodies: collections.Counter[tuple[str, int]] = collections.Counter()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.writers.append(writer)
        return reader, writer

    async def hold_connections(self) -> None:
        """CONNECTIONS keep-alive connections, each served once, then held open."""
        opening = asyncio.Semaphore(100)

        async def one() -> None:
            async with opening:
                reader, writer = await self._connect()
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: killswitch\r\n\r\n")
                await writer.drain()
                self.held_statuses[(await reader.readline()).strip()] += 1

        await asyncio.gather(*(one() for _ in range(CONNECTIONS)))

    async def slow_connections(self) -> None:
        """Idle sockets that send nothing, and request lines never finished."""
        for _ in range(IDLE):
            await self._connect()
        for i in range(PARTIAL):
            _, writer = await self._connect()
            writer.write(
                b"POST /v1/trip HTTP/1.1\r\nHost: x\r\nContent-Le"[: 10 + i % 30]
            )
            await writer.drain()

    async def bad_token_flood(self, session: aiohttp.ClientSession) -> None:
        """BAD_TOKENS trip requests with tokens that are not ours."""

        async def one(i: int) -> None:
            token = f"{TRIP_TOKEN[:-1]}{i}" if i % 2 else secrets.token_urlsafe(24)
            status, _ = await post(session, self.daemon.api + "/v1/trip", token, {})
            self.flood[status] += 1

        await asyncio.gather(*(one(i) for i in range(BAD_TOKENS)))

    async def oversized(self, session: aiohttp.ClientSession) -> None:
        """Headers of 100 KB, and bodies over api.max_body_bytes."""
        requests = [
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * 100_000
            + b"\r\n\r\n",
            b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
            + b"\r\n",
            b"POST /v1/trip HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"t" * 100_000
            + b"\r\n\r\n",
        ]
        for i in range(BIG_HEADERS):
            line = await _status_line(self.daemon, requests[i % len(requests)])
            self.big_headers[line[:12]] += 1
        big = b"x" * 300_000
        for i in range(BIG_BODIES):
            headers = {"Authorization": f"Bearer {ONCALL_TOKEN}"}
            kind = "sized" if i % 2 else "chunked"
            if kind == "sized":
                data: Any = big  # with Content-Length
            else:

                async def chunks() -> Any:
                    for _ in range(10):
                        yield big[:30_000]

                data = chunks()  # chunked: no Content-Length to refuse up front
            try:
                async with session.post(
                    self.daemon.api + "/v1/reset", data=data, headers=headers
                ) as resp:
                    self.big_bodies[kind, resp.status] += 1
            except aiohttp.ClientError:
                self.big_bodies[kind, 0] += 1  # it answered 413 and hung up mid-body

    def release(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.mark.timeout(120)
async def test_api_abuse_all_at_once_a_valid_trip_still_trips(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """Connections, slow sockets, huge requests, bad tokens: a real trip still trips."""
    with _enough_fds():
        daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
        await daemon.wait_ready()
        fds_before = proc_fd_count(daemon.pid)
        abuser = Abuser(daemon)
        connector = aiohttp.TCPConnector(limit=50)
        async with aiohttp.ClientSession(connector=connector) as flood_session:
            async with asyncio.timeout(PHASE_SECONDS):
                await abuser.hold_connections()
                await abuser.slow_connections()
            flood = asyncio.create_task(abuser.bad_token_flood(flood_session))
            oversized = asyncio.create_task(abuser.oversized(flood_session))
            await wait_until(
                lambda: sum(abuser.flood.values()) >= BAD_TOKENS // 4, "flood"
            )
            fds_abused = proc_fd_count(daemon.pid)

            sent = time.monotonic()
            async with aiohttp.ClientSession() as session:
                status, body = await post(
                    session, daemon.api + "/v1/trip", TRIP_TOKEN, {"reason": "real"}
                )
            answered = time.monotonic()
            assert status == 202, body
            await ems_sim.sim.wait_for_requests(
                lambda rs: (
                    {r.exchange_id for r in cancels(rs, since=sent)} == set(ACCOUNTS)
                ),
                timeout_seconds=10,
            )
            on_wire = max(
                r.received_monotonic for r in cancels(ems_sim.sim.requests, since=sent)
            )
            async with asyncio.timeout(PHASE_SECONDS):
                await flood
                await oversized
        abuser.release()
        [done] = await daemon.wait_for_event("fanout_finished", source="webhook")

    print(  # noqa: T201 - the figures for the README
        f"abuse: {CONNECTIONS} held + {IDLE} idle + {PARTIAL} partial connections, "
        f"{BAD_TOKENS} bad tokens, {BIG_HEADERS} huge headers, {BIG_BODIES} huge "
        f"bodies; daemon fds {fds_before} -> {fds_abused}; valid trip: 202 after "
        f"{(answered - sent) * 1000:.1f} ms, every cancel-all received after "
        f"{(on_wire - sent) * 1000:.1f} ms; headers {dict(abuser.big_headers)}; "
        f"bodies {dict(abuser.big_bodies)}"
    )
    assert (done["ok"], done["failed"]) == (len(ACCOUNTS), 0)
    assert abuser.held_statuses == {b"HTTP/1.1 200 OK": CONNECTIONS}
    assert abuser.flood == {401: BAD_TOKENS}
    for line, count in abuser.big_headers.items():
        assert line.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), (line, count)
    assert abuser.big_bodies["sized", 413] == BIG_BODIES // 2
    assert set(abuser.big_bodies) <= {("sized", 413), ("chunked", 413), ("chunked", 0)}
    assert alive(daemon)
    status_code, _ = await daemon.request("GET", "/healthz")
    assert status_code == 200
    assert sorted((await get_status(daemon))["tripped_accounts"]) == sorted(ACCOUNTS)
    # Every abusive connection is gone from the daemon once we hang up.
    await wait_until(
        lambda: proc_fd_count(daemon.pid) <= fds_before + 10,
        f"daemon fds back near {fds_before}",
    )


async def test_api_abuse_stalled_trip_body_still_trips_everything(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """An authenticated trip whose body stops arriving trips every account anyway."""
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    host, port = _host_port(daemon)
    _, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/trip HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Authorization: Bearer " + TRIP_TOKEN.encode() + b'\r\n\r\n{"rea'
        )
        await writer.drain()
        # The risk engine is stuck mid-request; its connection stays open.
        await ems_sim.sim.wait_for_requests(
            lambda rs: {r.exchange_id for r in cancels(rs)} == set(ACCOUNTS),
            timeout_seconds=3,
        )
    finally:
        writer.close()


async def test_api_abuse_connections_at_the_fd_limit_still_let_a_trip_in(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """Idle connections up to the daemon's fd limit do not lock the trip API out."""
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    try:
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    except (OSError, ValueError) as exc:
        pytest.skip(f"cannot lower the daemon's RLIMIT_NOFILE: {exc}")
    host, port = _host_port(daemon)
    writers = []
    try:
        for _ in range(FD_LIMIT + 50):
            _, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
        async with aiohttp.ClientSession() as session:
            status, _ = await asyncio.wait_for(
                post(session, daemon.api + "/v1/trip", TRIP_TOKEN, {}), 3.0
            )
        assert status == 202
    finally:
        for writer in writers:
            writer.close()
