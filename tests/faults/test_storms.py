"""Storms and races on the real daemon: signal bursts, many clients trip and reset."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import signal
from datetime import datetime
from typing import Any

import aiohttp

from killswitch.sim import RecordedRequest
from tests.conftest import ACCOUNTS, RunningSim
from tests.faults.conftest import (
    ONCALL_TOKEN,
    TRIP_TOKEN,
    Daemons,
    alive,
    audit_records,
    cancels,
    get_metrics,
    get_status,
    metric,
    post,
    wait_until_async,
)
from tests.processes import DaemonProcess

DELAY_SECONDS = 0.05  # every EMS answer takes this long: sweeps overlap in time
SIGNALS = 1000
CLIENT_OPS = 200


def _slow_ems(sim: RunningSim) -> None:
    for account in ACCOUNTS:
        sim.sim.set_fault(account, delay_seconds=DELAY_SECONDS)


def _assert_one_cancel_in_flight_per_account(requests: list[RecordedRequest]) -> None:
    """Each cancel-all takes DELAY_SECONDS to answer; the next may not start before."""
    for account in ACCOUNTS:
        times = sorted(r.received_monotonic for r in cancels(requests, account))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert not gaps or min(gaps) >= DELAY_SECONDS * 0.9, (account, min(gaps))


async def _settled(daemon: DaemonProcess, source: str) -> dict[str, Any]:
    """Wait until no sweep runs and log, audit and metric agree on the trips."""
    state_dir = daemon.config_path.parent / "state"
    seen: dict[str, Any] = {}

    async def agree() -> bool:
        status = await get_status(daemon)
        counted = metric(
            await get_metrics(daemon), "killswitch_trips_total", source=source
        )
        logged = [
            e
            for e in daemon.events()
            if e["event"] == "trip_latched" and e["source"] == source
        ]
        audited = [
            r
            for r in audit_records(state_dir)
            if r["event"] == "trip" and r["source"] == source
        ]
        seen.update(status=status, counted=counted, logged=logged, audited=audited)
        return not status["sweeping"] and counted == len(logged) == len(audited)

    await wait_until_async(agree, "log, audit log and metrics agree", 30)
    return seen


async def test_storms_sigusr1_burst_coalesces_without_overlap(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """1,000 SIGUSR1 at once: alive, coalesced sweeps, log = audit = metric."""
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    _slow_ems(ems_sim)
    for i in range(SIGNALS):
        os.kill(daemon.pid, signal.SIGUSR1)
        if i % 10 == 9:
            # Pending SIGUSR1s merge in the kernel: let the daemon take some in
            # between, so the storm lands on sweeps that are running.
            await asyncio.sleep(0.001)
    seen = await _settled(daemon, "signal")

    assert alive(daemon)
    code, _ = await daemon.request("GET", "/healthz")
    assert code == 200
    trips = len(seen["logged"])
    assert 1 <= trips <= SIGNALS
    assert {e["trip_id"] for e in seen["logged"]} == {
        r["trip_id"] for r in seen["audited"]
    }
    assert sorted(seen["status"]["tripped_accounts"]) == sorted(ACCOUNTS)
    requests = list(ems_sim.sim.requests)
    per_account = collections.Counter(r.exchange_id for r in cancels(requests))
    for account in ACCOUNTS:
        # Coalescing: a handful of back-to-back sweeps, never one per signal.
        assert 1 <= per_account[account] <= 20, per_account
    _assert_one_cancel_in_flight_per_account(requests)
    print(  # noqa: T201 - the figures for the README
        f"storm: {SIGNALS} SIGUSR1 -> {trips} trips latched, cancel-alls per "
        f"account {dict(per_account)}"
    )


def _wall(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


async def test_storms_concurrent_trips_and_resets_stay_consistent(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """200 mixed trips and resets at once: no 5xx, no overlap, the last one wins."""
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    _slow_ems(ems_sim)
    rng = random.Random(1234)  # noqa: S311 - a reproducible mix
    ops = [
        rng.choice(["trip", "trip", "trip", "reset", "reset"])
        for _ in range(CLIENT_OPS)
    ]
    connector = aiohttp.TCPConnector(limit=CLIENT_OPS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, op: str) -> tuple[str, int, Any]:
            if op == "trip":
                body = {"reason": f"race {i}"}
                status, reply = await post(
                    session, daemon.api + "/v1/trip", TRIP_TOKEN, body
                )
            else:
                body = {"reason": f"race {i}"}
                status, reply = await post(
                    session, daemon.api + "/v1/reset", ONCALL_TOKEN, body
                )
            return op, status, reply

        results = await asyncio.gather(*(one(i, op) for i, op in enumerate(ops)))
    seen = await _settled(daemon, "webhook")

    statuses = collections.Counter((op, status) for op, status, _ in results)
    assert statuses == {
        ("trip", 202): ops.count("trip"),
        ("reset", 200): ops.count("reset"),
    }, statuses
    assert seen["counted"] == ops.count("trip")
    resets_audited = [
        r
        for r in audit_records(daemon.config_path.parent / "state")
        if r["event"] == "reset"
    ]
    assert len(resets_audited) == ops.count("reset")
    _assert_one_cancel_in_flight_per_account(list(ems_sim.sim.requests))

    # The latch ends as the last operation the daemon processed left it.
    status = seen["status"]
    last_trip = status["last_trip"]["time"]
    last_reset = max(
        _wall(e["timestamp"]) for e in daemon.events() if e["event"] == "reset_done"
    )
    tripped = {a for a, s in status["accounts"].items() if s["tripped"]}
    if last_trip > last_reset:
        assert tripped == set(ACCOUNTS)
        for account in ACCOUNTS:
            assert status["accounts"][account]["tripped_at"] > last_reset
    else:
        assert tripped == set()
        assert status["state"] == "armed"
    halt_file = daemon.config_path.parent / "halted"
    assert halt_file.exists() == bool(tripped)


async def test_storms_reset_during_a_slow_cancel_lets_it_finish(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """A reset while a cancel-all is in flight re-arms, and that cancel still lands."""
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    ems_sim.sim.set_fault("COINBASE", delay_seconds=0.6)
    daemon.send(signal.SIGUSR1)
    await ems_sim.sim.wait_for_requests(
        lambda rs: bool(cancels(rs, "COINBASE")), timeout_seconds=5
    )
    status, reply = await daemon.request(
        "POST", "/v1/reset", token=ONCALL_TOKEN, json_body={"reason": "too early"}
    )
    assert status == 200
    assert reply["state"] == "armed"
    assert "COINBASE" in reply["still_sweeping"]
    [slow] = await daemon.wait_for_event(
        "cancel_all_attempted", account="COINBASE", outcome="accepted"
    )
    assert slow["attempt"] == 1
    assert ems_sim.sim.open_orders("COINBASE") == []
    await daemon.wait_for_event("fanout_finished", source="signal")
    body = await get_status(daemon)
    coinbase = body["accounts"]["COINBASE"]
    assert (coinbase["tripped"], coinbase["last_outcome"], coinbase["flat"]) == (
        False,
        "accepted",
        True,
    )
    assert body["state"] == "armed"
