"""CancelLines: the pre-serialized first attempt on a warm line, and its fallbacks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from killswitch.config import Config
from killswitch.ems import EmsClient, line_specs
from killswitch.errors import EmsRejectedError, EmsUnavailableError
from killswitch.fanout import Fanout, Trip
from killswitch.line import CancelLines
from killswitch.metrics import Metrics
from tests.conftest import ACCOUNTS, API_KEY, RunningSim

CANCEL = "/v1/orders/cancel/all"


async def wait_ready(lines: CancelLines, n: int = len(ACCOUNTS)) -> None:
    async with asyncio.timeout(5):
        while lines.ready_count < n:
            await asyncio.sleep(0.01)


@pytest.fixture
async def lines(config: Config) -> AsyncIterator[CancelLines]:
    async with CancelLines(line_specs(config.ems, config.accounts)) as lines:
        await wait_ready(lines)
        yield lines


@pytest.fixture
def line_client(
    session: aiohttp.ClientSession, config: Config, lines: CancelLines
) -> EmsClient:
    return EmsClient(session, config.ems, config.accounts, lines)


async def test_line_fires_spec_request_and_is_reused(
    ems_sim: RunningSim, line_client: EmsClient, lines: CancelLines
) -> None:
    """A fired cancel-all is the spec's request; the same line serves the next one."""
    for _ in range(2):
        fired = line_client.fire("KRAKEN/JOHN")
        assert fired is not None
        ack = await line_client.cancel_all("KRAKEN/JOHN", fired=fired)
        assert ack.status == 200
    requests = [r for r in ems_sim.sim.requests if r.path == CANCEL]
    assert len(requests) == 2
    for r in requests:
        assert r.method == "POST"
        assert json.loads(r.body) == {"exchange_id": "KRAKEN/JOHN"}
        assert r.headers["X-CoinAPI-Key"] == API_KEY
    assert lines.ready_count == len(ACCOUNTS)


async def test_line_is_busy_until_answered(
    ems_sim: RunningSim, line_client: EmsClient
) -> None:
    """A line carries one request at a time: a second fire waits for the answer."""
    ems_sim.sim.set_fault("BINANCE", delay_seconds=0.2)
    fired = line_client.fire("BINANCE")
    assert fired is not None
    assert line_client.fire("BINANCE") is None
    await line_client.cancel_all("BINANCE", fired=fired)
    assert line_client.fire("BINANCE") is not None


async def test_line_classifies_rejects_like_the_session(
    ems_sim: RunningSim, line_client: EmsClient
) -> None:
    """Answers on a line go through the same classification as the aiohttp path."""
    ems_sim.sim.fail_next("COINBASE", 1, status=490)
    ems_sim.sim.fail_next("BINANCE", 1, status=401, reject_reason=None)
    with pytest.raises(EmsUnavailableError) as unreachable:
        await line_client.cancel_all("COINBASE", fired=line_client.fire("COINBASE"))
    assert unreachable.value.outcome == "retryable_reject"
    with pytest.raises(EmsRejectedError) as auth:
        await line_client.cancel_all("BINANCE", fired=line_client.fire("BINANCE"))
    assert auth.value.outcome == "auth_error"


async def test_line_dropped_connection_is_network_error_and_reopens(
    ems_sim: RunningSim, line_client: EmsClient, lines: CancelLines
) -> None:
    """A dropped connection fails as a network error; the line comes back."""
    ems_sim.sim.set_fault("BITSTAMP/2574", drop=True)
    with pytest.raises(EmsUnavailableError) as info:
        await line_client.cancel_all(
            "BITSTAMP/2574", fired=line_client.fire("BITSTAMP/2574")
        )
    assert info.value.outcome == "network_error"
    ems_sim.sim.set_fault("BITSTAMP/2574")
    await wait_ready(lines)


async def test_line_hang_times_out_and_abandons_the_line(
    ems_sim: RunningSim, line_client: EmsClient, lines: CancelLines
) -> None:
    """A hung answer times out; the line is dropped and re-opened, not reused."""
    ems_sim.sim.set_fault("KRAKEN/JOHN", hang=True)
    fired = line_client.fire("KRAKEN/JOHN")
    with pytest.raises(EmsUnavailableError) as info:
        await line_client.cancel_all("KRAKEN/JOHN", fired=fired, limit_seconds=0.2)
    assert info.value.outcome == "timeout"
    ems_sim.sim.set_fault("KRAKEN/JOHN")
    await wait_ready(lines)


async def test_fanout_first_attempt_goes_out_inside_submit(
    ems_sim: RunningSim, line_client: EmsClient, config: Config
) -> None:
    """With warm lines, every first cancel-all is written before submit() returns."""
    async with Fanout(
        line_client, config.retry, config.sweep, Metrics(CollectorRegistry())
    ) as fanout:
        seen = time.monotonic()
        trip = Trip(
            trip_id="t",
            source="cli",
            reason="x",
            accounts=ACCOUNTS,
            seen_monotonic=seen,
            seen_time=time.time(),
        )
        future, _ = fanout.submit(trip)
        returned = time.monotonic()
        result = await future
    assert result.failed == ()
    assert result.wire_seconds is not None
    assert seen + result.wire_seconds <= returned


async def test_fanout_falls_back_to_session_when_line_is_down(
    ems_sim: RunningSim, session: aiohttp.ClientSession, config: Config
) -> None:
    """No line (EMS not reachable at start-up): the first attempt uses the session."""
    client = EmsClient(session, config.ems, config.accounts, CancelLines({}))
    assert client.fire("BINANCE") is None
    async with Fanout(
        client, config.retry, config.sweep, Metrics(CollectorRegistry())
    ) as f:
        result = await f.sweep(
            Trip(
                trip_id="t",
                source="cli",
                reason="x",
                accounts=("BINANCE",),
                seen_monotonic=time.monotonic(),
                seen_time=time.time(),
            )
        )
    assert result.accounts["BINANCE"].ok
