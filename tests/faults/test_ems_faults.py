"""A different EMS fault on every account of one sweep, and an EMS that is not there."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from killswitch.sim import Simulator, running_simulator
from tests.conftest import ACCOUNTS, API_KEY
from tests.faults.conftest import (
    TRIP_TOKEN,
    Daemons,
    cancels,
    get_metrics,
    get_status,
    metric,
    wait_until_async,
)
from tests.processes import DaemonProcess, free_port

TIMEOUT_SECONDS = 0.5
DEADLINE_SECONDS = 3.0
DEADLINE_MARGIN_SECONDS = 0.5
RETRY_AFTER_SECONDS = 1.0  # what the simulator's 429 carries

# account -> (last outcome, verified flat, attempts: exact or None for "> 1")
EXPECTED: dict[str, tuple[str, bool, int | None]] = {
    "HANG": ("timeout", False, None),
    "UNREACHABLE/490": ("accepted", True, 3),
    "SERVER/503": ("accepted", True, 3),
    "DROP": ("network_error", False, None),
    "GARBAGE": ("accepted", True, 1),
    "HUGE": ("accepted", True, 1),
    "DRIP": ("accepted", True, 1),
    "RATE/429": ("accepted", True, 2),
    "SURVIVOR": ("accepted", True, 2),
}
FAULTY_ACCOUNTS = tuple(EXPECTED)


def _inject(sim: Simulator) -> None:
    sim.set_fault("HANG", hang=True)
    sim.fail_next("UNREACHABLE/490", 2, status=490)
    sim.fail_next("SERVER/503", 2, status=503)
    sim.set_fault("DROP", drop=True)
    sim.set_fault("GARBAGE", garbage_body=True)
    sim.set_fault("HUGE", huge_body_bytes=1024 * 1024)
    sim.set_fault("DRIP", drip_seconds=0.3)
    sim.fail_next("RATE/429", 1, status=429)
    sim.set_fault("SURVIVOR", survive_cancels=1)


def _fast_config(base_url: str, **sweep: Any) -> dict[str, Any]:
    return {
        "ems": {
            "default": {
                "base_url": base_url,
                "api_key_env": "TEST_COINAPI_KEY",
                "timeout_seconds": TIMEOUT_SECONDS,
            }
        },
        "retry": {
            "max_attempts": 6,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.2,
            "max_attempts_other": 2,
        },
        "sweep": {
            "deadline_seconds": DEADLINE_SECONDS,
            "verify": True,
            "verify_attempts": 3,
            "resweep_interval_seconds": 0,
            **sweep,
        },
    }


async def test_ems_faults_every_account_its_own_fault_in_one_sweep(
    daemons: Daemons,
) -> None:
    """Nine faults at once: right outcome each, no account waits, deadline kept."""
    sim = Simulator(FAULTY_ACCOUNTS, api_key=API_KEY, orders_per_account=3)
    async with running_simulator(sim) as base_url:
        config = daemons.write(base_url, FAULTY_ACCOUNTS, **_fast_config(base_url))
        daemon = daemons.start(config)
        await daemon.wait_ready()
        _inject(sim)
        daemon.send(signal.SIGUSR1)
        [done] = await daemon.wait_for_event("fanout_finished", timeout_seconds=15)
        status = await get_status(daemon)
        metrics = await get_metrics(daemon)
        events = daemon.events()

    assert done["duration_seconds"] <= DEADLINE_SECONDS + DEADLINE_MARGIN_SECONDS
    expected_failed = sorted(a for a, (_, flat, _) in EXPECTED.items() if not flat)
    assert (done["ok"], done["failed"]) == (
        len(EXPECTED) - len(expected_failed),
        len(expected_failed),
    )
    for account, (outcome, flat, attempts) in EXPECTED.items():
        got = status["accounts"][account]
        assert (got["last_outcome"], got["flat"]) == (outcome, flat), (account, got)
        if attempts is None:
            assert got["attempts"] > 1, (account, got)
        else:
            assert got["attempts"] == attempts, (account, got)
        assert got["open_orders"] in ((0,) if flat else (3, None)), (account, got)
        counted = metric(
            metrics,
            "killswitch_cancel_requests_total",
            account=account,
            outcome=outcome,
        )
        assert counted is not None
        assert counted >= 1
    not_flat = {
        e["account"]: e["outcome"] for e in events if e["event"] == "account_not_flat"
    }
    assert not_flat == {"HANG": "timeout", "DROP": "network_error"}
    attempts_logged = {
        (e["account"], e["outcome"])
        for e in events
        if e["event"] == "cancel_all_attempted"
    }
    for account, (outcome, _, _) in EXPECTED.items():
        assert (account, outcome) in attempts_logged

    # No account waits for another: the first attempts arrive together, and the
    # quick accounts are done (retries, re-cancels) before the hung one times out.
    first = {a: cancels(sim.requests, a)[0].received_monotonic for a in EXPECTED}
    spread = max(first.values()) - min(first.values())
    print(  # noqa: T201 - the figures for the README
        f"ems faults: {len(EXPECTED)} faults in one sweep, duration "
        f"{done['duration_seconds']:.2f}s (deadline {DEADLINE_SECONDS}s), first "
        f"cancel-alls within {spread * 1000:.1f} ms"
    )
    assert spread < 0.2, f"first cancel-alls spread over {spread:.3f}s"
    hang_times_out = first["HANG"] + TIMEOUT_SECONDS
    for account in ("UNREACHABLE/490", "SERVER/503", "SURVIVOR"):
        last = cancels(sim.requests, account)[-1].received_monotonic
        assert last < hang_times_out, account
    rate = cancels(sim.requests, "RATE/429")
    assert rate[1].received_monotonic - rate[0].received_monotonic >= (
        RETRY_AFTER_SECONDS - 0.05
    ), "Retry-After not honoured"
    quick = {
        e["account"]: e["latency_ms"]
        for e in events
        if e["event"] == "cancel_all_attempted" and e["attempt"] == 1
    }
    for account in ("GARBAGE", "HUGE", "SURVIVOR"):
        assert quick[account] < TIMEOUT_SECONDS * 1000 / 2, (account, quick[account])


async def _http_status(daemon: DaemonProcess, path: str) -> int:
    status, _ = await daemon.request("GET", path)
    return status


async def _ems_up(daemon: DaemonProcess) -> float | None:
    return metric(await get_metrics(daemon), "killswitch_ems_up", ems="default")


@pytest.mark.parametrize("where", ["refused", "unresolvable"])
async def test_ems_faults_absent_ems_at_startup_daemon_starts_and_retries(
    where: str, daemons: Daemons
) -> None:
    """No EMS at boot: the daemon starts, says not ready, and trips retry to the end."""
    port = free_port()
    base_url = (
        f"http://127.0.0.1:{port}" if where == "refused" else "http://ems.invalid:9"
    )
    sweep = {"deadline_seconds": 1.5, "verify_attempts": 2}
    config = daemons.write(base_url, ACCOUNTS, **_fast_config(base_url, **sweep))
    daemon = daemons.start(config)
    await daemon.wait_ready()
    assert await _http_status(daemon, "/healthz") == 200
    assert await _http_status(daemon, "/readyz") == 503

    async def probed_down() -> bool:
        return await _ems_up(daemon) == 0

    await wait_until_async(probed_down, "killswitch_ems_up 0")
    status, _ = await daemon.request(
        "POST", "/v1/trip", token=TRIP_TOKEN, json_body={"reason": "no ems"}
    )
    assert status == 202
    [done] = await daemon.wait_for_event("fanout_finished", source="webhook")
    assert (done["ok"], done["failed"]) == (0, len(ACCOUNTS))
    assert done["duration_seconds"] <= 1.5 + DEADLINE_MARGIN_SECONDS
    body = await get_status(daemon)
    for account in ACCOUNTS:
        got = body["accounts"][account]
        assert got["last_outcome"] == "network_error", (account, got)
        assert got["attempts"] > 1, (account, got)
        assert got["flat"] is False
    assert await _http_status(daemon, "/healthz") == 200
    if where == "unresolvable":
        return

    # The EMS comes up on that port: the very next trip gets through.
    sim = Simulator(ACCOUNTS, api_key=API_KEY, orders_per_account=3)
    async with running_simulator(sim, port=port):
        status, _ = await daemon.request(
            "POST", "/v1/trip", token=TRIP_TOKEN, json_body={"reason": "ems back"}
        )
        assert status == 202
        done_events = await daemon.wait_for_event(
            "fanout_finished", 2, source="webhook"
        )
        assert (done_events[1]["ok"], done_events[1]["failed"]) == (len(ACCOUNTS), 0)
        assert {r.exchange_id for r in cancels(sim.requests)} == set(ACCOUNTS)

        async def ready() -> bool:
            return await _http_status(daemon, "/readyz") == 200

        await wait_until_async(ready, "/readyz 200 once the EMS answers")
        assert await _ems_up(daemon) == 1
