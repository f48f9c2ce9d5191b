"""kill -9 the real daemon at many points of a sweep: no acknowledged trip is lost.

What "acknowledged" means here, precisely:

* `POST /v1/trip`: a 202 whose body says `"persisted": true`. The handler
  latches and fires the cancel-alls synchronously, then waits (bounded) until
  the state write covering the trip is fsynced before it answers; a 202 with
  `"persisted": false` admits that a crash may forget the trip.
* SIGUSR1 has no reply: it is never acknowledged. A kill within milliseconds of
  it may lose the trip, but must never leave a torn or half-applied state.

The randomized sweep kills at points chosen per phase (cancel-alls in flight,
retries pending, verification running, the restarted daemon's own start-up
sweep, right after a signal) and asserts that the restarted daemon sweeps
every acknowledged account again (source `startup`, checked against the
simulator's record) and keeps it latched. A second test kills the very moment
the 202 arrives.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ACCOUNTS, RunningSim
from tests.faults.conftest import (
    ONCALL_TOKEN,
    ORDERS,
    TRIP_TOKEN,
    Daemons,
    cancels,
    get_status,
    kill9,
    persisted_trips,
    post,
    wait_until,
)
from tests.processes import DaemonProcess

SEED = 1234
ITERATIONS = int(os.environ.get("KILLSWITCH_CRASH_ITERATIONS", "50"))
PHASES = (
    "in_flight",  # first cancel-alls still unanswered
    "retries_pending",  # 490/503/504 answered, retries sleeping or sent
    "verifying",  # orders survived a cancel, GET /v1/orders running
    "startup_sweep",  # the restarted daemon is killed mid start-up sweep too
    "signal",  # SIGUSR1 then kill within 0-80 ms: no ack, may be lost, never torn
)
CRASH_CONFIG: dict[str, Any] = {
    "retry": {
        "max_attempts": 6,
        "backoff_initial_seconds": 0.02,
        "backoff_max_seconds": 0.1,
        "max_attempts_other": 2,
    },
    "sweep": {
        "deadline_seconds": 3.0,
        "verify": True,
        "verify_attempts": 3,
        "resweep_interval_seconds": 0,
    },
}


class Crasher:
    """One daemon after another on the same state dir, killed and restarted."""

    def __init__(self, sim: RunningSim, daemons: Daemons, config: Path) -> None:
        self.sim = sim
        self.daemons = daemons
        self.config = config
        self.state_dir = config.parent / "state"
        self.daemon: DaemonProcess | None = None

    @property
    def current(self) -> DaemonProcess:
        assert self.daemon is not None
        return self.daemon

    async def start(self) -> DaemonProcess:
        self.daemon = self.daemons.start(self.config)
        await self.daemon.wait_ready()
        return self.daemon

    def kill(self) -> dict[str, str]:
        """kill -9 now; what state.json holds afterwards (account -> trip id)."""
        kill9(self.current)
        trips = persisted_trips(self.state_dir)
        return {} if trips is None else trips

    async def rearm(self, session: aiohttp.ClientSession) -> None:
        """Reset every account and wait until the state file says so."""
        status, _ = await post(
            session, self.current.api + "/v1/reset", ONCALL_TOKEN, {"reason": "next"}
        )
        assert status == 200
        await wait_until(
            lambda: persisted_trips(self.state_dir) == {}, "state.json re-armed"
        )

    async def trip(self, session: aiohttp.ClientSession, accounts: list[str]) -> str:
        status, body = await post(
            session,
            self.current.api + "/v1/trip",
            TRIP_TOKEN,
            {"reason": "crash drill", "accounts": accounts},
        )
        assert (status, body["persisted"]) == (202, True), body
        trip_id: str = body["trip_id"]
        return trip_id

    async def check_restart(self, persisted: dict[str, str]) -> None:
        """Restart; every persisted account is swept (source startup) and latched."""
        self.sim.sim.reset()
        daemon = await self.start()
        if persisted:
            [done] = await daemon.wait_for_event("fanout_finished", source="startup")
            # Bytes the killed process wrote may reach the simulator late; only
            # requests received after this start-up trip was seen count.
            swept = {
                r.exchange_id
                for r in cancels(self.sim.sim.requests, since=done["seen_monotonic"])
            }
            missing = sorted(set(persisted) - swept)
            assert not missing, f"not swept again at start-up: {missing}"
        status = await get_status(daemon)
        assert set(status["tripped_accounts"]) == set(persisted)
        events = {e.get("event") for e in daemon.events()}
        assert "state_unreadable" not in events, "a kill -9 tore the state file"


@pytest.mark.timeout(300)
async def test_crash_kill9_anywhere_in_a_sweep_loses_no_acknowledged_trip(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """Random kill -9 points (fixed seed): every acknowledged trip is swept again."""
    rng = random.Random(SEED)  # noqa: S311 - reproducible kill points
    crasher = Crasher(
        ems_sim, daemons, daemons.write(ems_sim.base_url, ACCOUNTS, **CRASH_CONFIG)
    )
    tally: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    await crasher.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(ITERATIONS):
            phase = rng.choice(PHASES)
            accounts = rng.sample(ACCOUNTS, rng.randint(1, len(ACCOUNTS)))
            await crasher.rearm(session)
            ems_sim.sim.reset()
            acknowledged: set[str] = set()
            if phase == "signal":
                accounts = list(ACCOUNTS)
                crasher.current.send(signal.SIGUSR1)
                await asyncio.sleep(rng.uniform(0.0, 0.08))  # the kill point
                persisted = crasher.kill()
                assert set(persisted) in (set(), set(ACCOUNTS)), persisted
                tally["signal_persisted" if persisted else "signal_lost"] += 1
            else:
                persisted = await _crash_after_acknowledged_trip(
                    crasher, session, phase, accounts, rng
                )
                acknowledged = set(accounts)
                tally[phase] += 1
            lost = acknowledged - set(persisted)
            assert not lost, f"{phase}: acknowledged, then lost: {lost}"
            await crasher.check_restart(persisted)
    elapsed = time.monotonic() - started
    print(f"crash sweep: {ITERATIONS} kills in {elapsed:.1f}s: {dict(tally)}")  # noqa: T201


async def _crash_after_acknowledged_trip(
    crasher: Crasher,
    session: aiohttp.ClientSession,
    phase: str,
    accounts: list[str],
    rng: random.Random,
) -> dict[str, str]:
    """Trip `accounts`, wait for the phase, kill -9; what state.json then holds."""
    sim = crasher.sim.sim
    if phase == "in_flight":
        for account in accounts:
            sim.set_fault(account, delay_seconds=rng.uniform(0.05, 0.3))
    elif phase == "retries_pending":
        for account in accounts:
            status = rng.choice([490, 503, 504])
            sim.fail_next(account, rng.randint(2, 4), status=status)
    elif phase == "verifying":
        for account in accounts:
            sim.set_fault(account, survive_cancels=1, delay_seconds=0.05)
    sent = time.monotonic()
    await crasher.trip(session, accounts)
    if phase == "retries_pending":
        await wait_until(
            lambda: any(len(cancels(sim.requests, a)) >= 2 for a in accounts),
            "a cancel-all retried",
        )
    elif phase == "verifying":
        await wait_until(
            lambda: any(
                r.path == ORDERS and r.exchange_id in accounts
                for r in sim.requests
                if r.received_monotonic > sent
            ),
            "verification started",
        )
    await asyncio.sleep(rng.uniform(0.0, 0.1))  # the kill point within the phase
    persisted = crasher.kill()
    if phase == "startup_sweep":
        # The restarted daemon dies too, in the middle of its start-up sweep.
        sim.reset()
        for account in ACCOUNTS:
            sim.set_fault(account, delay_seconds=0.3)
        restarted = time.monotonic()
        crasher.daemon = crasher.daemons.start(crasher.config)
        await wait_until(
            lambda: bool(cancels(sim.requests, since=restarted)),
            "start-up sweep on the wire",
        )
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        persisted = crasher.kill()
    return persisted


@pytest.mark.timeout(120)
async def test_crash_kill9_right_after_the_202_loses_no_trip(
    ems_sim: RunningSim, daemons: Daemons
) -> None:
    """A 202 saying persisted survives a kill -9 that follows the answer at once."""
    config = daemons.write(ems_sim.base_url, ACCOUNTS, **CRASH_CONFIG)
    crasher = Crasher(ems_sim, daemons, config)
    runs = 8
    lost = 0
    async with aiohttp.ClientSession() as session:
        for run in range(runs):
            for name in ("state.json", "audit.jsonl"):
                (crasher.state_dir / name).unlink(missing_ok=True)
            ems_sim.sim.reset()
            if run % 2:  # half with slow cancel-alls, half answered at once
                for account in ACCOUNTS:
                    ems_sim.sim.set_fault(account, delay_seconds=0.2)
            daemon = await crasher.start()
            await wait_until(
                lambda: persisted_trips(crasher.state_dir) == {}, "first state write"
            )
            headers = {"Authorization": f"Bearer {TRIP_TOKEN}"}
            async with session.post(
                daemon.api + "/v1/trip", json={"reason": "ack drill"}, headers=headers
            ) as resp:
                reply = await resp.json()
                persisted = crasher.kill()  # the moment the 202 is in
            assert (resp.status, reply["persisted"]) == (202, True), reply
            lost += set(persisted) != set(ACCOUNTS)
    print(f"kill -9 right after the 202: {lost} of {runs} acknowledged trips lost")  # noqa: T201
    assert lost == 0, f"{lost} of {runs} acknowledged trips lost"
