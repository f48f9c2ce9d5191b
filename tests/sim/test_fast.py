"""The simulator's fast path (killswitch/sim/fast.py) answers exactly like the app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from killswitch.sim import Simulator, create_sim_app, running_simulator

KRAKEN = "KRAKEN/JOHN"
BINANCE = "BINANCE"
KEY = "sim-key-fast-path"


def _sim() -> Simulator:
    return Simulator([KRAKEN, BINANCE], api_key=KEY, orders_per_account=2)


def _cancel_all(host: str, exchange_id: str, *, key: str = KEY) -> bytes:
    body = json.dumps({"exchange_id": exchange_id}).encode()
    return (
        f"POST /v1/orders/cancel/all HTTP/1.1\r\nHost: {host}\r\n"
        f"X-CoinAPI-Key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ")[1]), headers, body


@pytest.fixture
async def app_only_url() -> AsyncIterator[tuple[Simulator, str]]:
    """The same simulator served by the aiohttp app alone (no fast path)."""
    sim = _sim()
    runner = web.AppRunner(create_sim_app(sim), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield sim, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fast_url() -> AsyncIterator[tuple[Simulator, str]]:
    sim = _sim()
    async with running_simulator(sim) as url:
        yield sim, url


async def _exchange(url: str) -> list[tuple[int, str, object]]:
    answers = []
    headers = {"X-CoinAPI-Key": KEY}
    async with aiohttp.ClientSession(url, headers=headers) as session:
        orders = {"exchange_id": KRAKEN}
        steps = (
            session.get("/v1/orders", params=orders),
            session.post("/v1/orders/cancel/all", json={"exchange_id": KRAKEN}),
            session.get("/v1/orders", params=orders),
            session.post("/v1/orders/cancel/all", json={"exchange_id": "NEW/ACC"}),
        )
        for step in steps:
            async with step as r:
                answers.append((r.status, r.headers["Content-Type"], await r.json()))
    return answers


async def test_fast_path_answers_like_the_app(app_only_url, fast_url):
    """Status, content type and body of plain requests match the aiohttp app's."""
    app_sim, app_url = app_only_url
    fast_sim, fast_url_ = fast_url

    expected = await _exchange(app_url)
    got = await _exchange(fast_url_)

    assert _shape(got) == _shape(expected)
    assert [(r.method, r.path, r.exchange_id) for r in fast_sim.requests] == [
        (r.method, r.path, r.exchange_id) for r in app_sim.requests
    ]
    assert fast_sim.requests[1].headers["x-coinapi-key"] == KEY
    assert fast_sim.open_orders(KRAKEN) == []


def _shape(answers: list[tuple[int, str, object]]) -> list[object]:
    """Answers without what differs by design: generated order ids and times."""

    def shape(doc: object) -> object:
        if isinstance(doc, list):
            return [(sorted(o), o["exchange_id"], o["status"]) for o in doc]
        return doc

    return [(status, ctype, shape(doc)) for status, ctype, doc in answers]


async def test_fast_path_hands_a_connection_to_the_app_and_keeps_serving(fast_url):
    """After a request the fast path does not serve, the same connection still works."""
    sim, url = fast_url
    host = url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(*host.split(":"))
    try:
        writer.write(_cancel_all(host, KRAKEN))
        assert (await _read_response(reader))[0] == 200
        writer.write(
            f"GET /nowhere HTTP/1.1\r\nHost: {host}\r\n"
            f"X-CoinAPI-Key: {KEY}\r\n\r\n".encode()
        )
        assert (await _read_response(reader))[0] == 404
        writer.write(_cancel_all(host, BINANCE, key="wrong"))
        assert (await _read_response(reader))[0] == 401
        writer.write(_cancel_all(host, BINANCE))
        status, headers, body = await _read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status == 200
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body)["exchange_id"] == BINANCE
    assert [r.exchange_id for r in sim.requests] == [KRAKEN, None, BINANCE, BINANCE]


async def test_fast_path_serves_split_and_pipelined_requests_in_order(fast_url):
    """A request written byte by byte, then two at once, are all answered in order."""
    sim, url = fast_url
    sim.set_latency(0.02)
    host = url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(*host.split(":"))
    try:
        for byte in _cancel_all(host, KRAKEN):
            writer.write(bytes([byte]))
            await writer.drain()
        writer.write(_cancel_all(host, BINANCE) + _cancel_all(host, "OKX"))
        bodies = [json.loads((await _read_response(reader))[2]) for _ in range(3)]
    finally:
        writer.close()
        await writer.wait_closed()
    assert [b["exchange_id"] for b in bodies] == [KRAKEN, BINANCE, "OKX"]


async def test_fast_path_client_gone_during_latency_leaves_orders_open(fast_url):
    """As in the app: a client that disconnects during the latency cancels nothing."""
    sim, url = fast_url
    sim.set_latency(0.2)
    host = url.removeprefix("http://")
    _, writer = await asyncio.open_connection(*host.split(":"))
    writer.write(_cancel_all(host, KRAKEN))
    await sim.wait_for_requests(lambda requests: len(requests) == 1)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    assert len(sim.open_orders(KRAKEN)) == 2


async def test_fast_path_leaves_faulty_accounts_to_the_app(fast_url):
    """A scripted failure is answered (by the app) even on a fast connection."""
    sim, url = fast_url
    sim.fail_next(KRAKEN, 1, status=490)
    host = url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(*host.split(":"))
    try:
        writer.write(_cancel_all(host, BINANCE))
        assert (await _read_response(reader))[0] == 200
        writer.write(_cancel_all(host, KRAKEN))
        status, headers, body = await _read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status == 490
    assert headers["content-type"] == "appliction/json"
    assert json.loads(body)["reject_reason"] == "EXCHANGE_UNREACHABLE"
    assert len(sim.open_orders(KRAKEN)) == 2
