"""Fanout against the real simulator: concurrency, retries, deadline, verification."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from killswitch.config import RetryConfig, SweepConfig
from killswitch.ems import EmsClient
from killswitch.fanout import Fanout, Trip, resolve_accounts
from killswitch.metrics import Metrics
from tests.conftest import ACCOUNTS, RunningSim, make_config

CANCEL = "/v1/orders/cancel/all"


def trip(accounts: tuple[str, ...] = ACCOUNTS, trip_id: str = "t1") -> Trip:
    return Trip(
        trip_id=trip_id,
        source="cli",
        reason="test",
        accounts=accounts,
        seen_monotonic=time.monotonic(),
        seen_time=time.time(),
    )


def cancels(sim: RunningSim, account: str | None = None) -> list[str]:
    return [
        r.exchange_id or ""
        for r in sim.sim.requests
        if r.path == CANCEL and (account is None or r.exchange_id == account)
    ]


async def test_fanout_cancels_every_account_once_and_verifies_flat(
    ems_sim: RunningSim, fanout: Fanout, registry: CollectorRegistry
) -> None:
    """Every account gets exactly one cancel-all, then a verify that sees it flat."""
    result = await fanout.sweep(trip())
    assert sorted(cancels(ems_sim)) == sorted(ACCOUNTS)
    assert result.failed == ()
    for account in ACCOUNTS:
        r = result.accounts[account]
        assert (r.outcome, r.attempts, r.open_orders, r.flat) == (
            "accepted",
            1,
            0,
            True,
        )
        assert (
            registry.get_sample_value("killswitch_account_flat", {"account": account})
            == 1
        )
    assert result.wire_seconds is not None
    assert registry.get_sample_value("killswitch_sweep_duration_seconds_count") == 1


async def test_fanout_retries_response_timeout_then_succeeds(
    ems_sim: RunningSim, fanout: Fanout, registry: CollectorRegistry
) -> None:
    """Two leading EXCHANGE_RESPONSE_TIMEOUT rejects: exactly three attempts there."""
    ems_sim.sim.fail_next(
        "KRAKEN/JOHN", 2, status=200, reject_reason="EXCHANGE_RESPONSE_TIMEOUT"
    )
    result = await fanout.sweep(trip())
    assert len(cancels(ems_sim, "KRAKEN/JOHN")) == 3
    assert result.accounts["KRAKEN/JOHN"].attempts == 3
    assert result.accounts["KRAKEN/JOHN"].ok
    for other in set(ACCOUNTS) - {"KRAKEN/JOHN"}:
        assert len(cancels(ems_sim, other)) == 1
    assert (
        registry.get_sample_value(
            "killswitch_cancel_retries_total",
            {"account": "KRAKEN/JOHN", "reason": "retryable_reject"},
        )
        == 2
    )
    assert (
        registry.get_sample_value(
            "killswitch_cancel_requests_total",
            {"account": "KRAKEN/JOHN", "outcome": "retryable_reject"},
        )
        == 2
    )


@pytest.mark.parametrize(
    ("status", "outcome"), [(400, "rejected"), (401, "auth_error")]
)
async def test_fanout_does_not_retry_final_answers(
    ems_sim: RunningSim, fanout: Fanout, status: int, outcome: str
) -> None:
    """400 and 401 are not retried; the account is reported, still verified."""
    ems_sim.sim.fail_next("COINBASE", 1, status=status, reject_reason=None)
    result = await fanout.sweep(trip())
    assert len(cancels(ems_sim, "COINBASE")) == 1
    r = result.accounts["COINBASE"]
    assert (r.outcome, r.attempts, r.flat) == (outcome, 1, False)
    assert r.open_orders == 3
    assert result.failed == ("COINBASE",)


async def test_fanout_retries_reject_other_at_most_max_attempts_other(
    ems_sim: RunningSim, fanout: Fanout
) -> None:
    """A reject OTHER is retried, but only up to retry.max_attempts_other."""
    ems_sim.sim.fail_next("BINANCE", 5, status=200, reject_reason="OTHER")
    result = await fanout.sweep(trip(("BINANCE",)))
    assert result.accounts["BINANCE"].outcome == "rejected"
    # 2 attempts in the cancel phase, then 2 more for each verify re-cancel
    first_phase = result.accounts["BINANCE"].attempts
    assert first_phase >= 2
    assert len(cancels(ems_sim, "BINANCE")) == first_phase


async def test_fanout_stops_at_max_attempts(
    ems_sim: RunningSim, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Retries stop at retry.max_attempts when the exchange never recovers."""
    cfg = make_config(
        ems_sim.base_url,
        tmp_path,
        retry=RetryConfig(
            max_attempts=3, backoff_initial_seconds=0.001, backoff_max_seconds=0.001
        ),
        sweep=SweepConfig(deadline_seconds=5, verify=False),
    )
    ems_sim.sim.fail_next("COINBASE", 10, status=490)
    async with Fanout(
        EmsClient(session, cfg.ems, cfg.accounts),
        cfg.retry,
        cfg.sweep,
        Metrics(CollectorRegistry()),
    ) as fanout:
        result = await fanout.sweep(trip(("COINBASE",)))
    assert len(cancels(ems_sim, "COINBASE")) == 3
    assert result.accounts["COINBASE"].outcome == "retryable_reject"
    assert result.accounts["COINBASE"].flat is None
    assert result.failed == ("COINBASE",)


async def test_fanout_hung_account_is_retried_within_deadline_without_delaying_others(
    ems_sim: RunningSim, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A hung account times out and is retried; the others finish long before it."""
    cfg = make_config(
        ems_sim.base_url,
        tmp_path,
        timeout_seconds=0.3,
        sweep=SweepConfig(deadline_seconds=1.0, verify=True, verify_attempts=1),
    )
    ems_sim.sim.set_fault("BITSTAMP/2574", hang=True)
    async with Fanout(
        EmsClient(session, cfg.ems, cfg.accounts),
        cfg.retry,
        cfg.sweep,
        Metrics(CollectorRegistry()),
    ) as fanout:
        started = time.monotonic()
        result = await fanout.sweep(trip())
        elapsed = time.monotonic() - started
    hung = result.accounts["BITSTAMP/2574"]
    assert hung.outcome == "timeout"
    assert hung.attempts >= 2
    assert len(cancels(ems_sim, "BITSTAMP/2574")) == hung.attempts
    assert elapsed < cfg.sweep.deadline_seconds + 1.0
    for other in set(ACCOUNTS) - {"BITSTAMP/2574"}:
        r = result.accounts[other]
        assert r.ok
        # their whole sweep ended before the hung account's first timeout
        assert r.duration_seconds < cfg.ems["default"].timeout_seconds


async def test_fanout_recancels_orders_that_survive_until_flat(
    ems_sim: RunningSim, fanout: Fanout
) -> None:
    """Orders surviving a cancel-all are seen by verify, re-cancelled, then flat."""
    ems_sim.sim.set_fault("KRAKEN/JOHN", survive_cancels=1)
    result = await fanout.sweep(trip(("KRAKEN/JOHN",)))
    r = result.accounts["KRAKEN/JOHN"]
    assert len(cancels(ems_sim, "KRAKEN/JOHN")) == 2
    assert (r.attempts, r.open_orders, r.flat) == (2, 0, True)
    assert ems_sim.sim.open_orders("KRAKEN/JOHN") == []


async def test_fanout_reports_not_flat_when_orders_keep_surviving(
    ems_sim: RunningSim, fanout: Fanout, registry: CollectorRegistry
) -> None:
    """Orders that survive every re-cancel leave the account reported not flat."""
    ems_sim.sim.set_fault("KRAKEN/JOHN", survive_cancels=10)
    result = await fanout.sweep(trip(("KRAKEN/JOHN",)))
    r = result.accounts["KRAKEN/JOHN"]
    assert (r.flat, r.open_orders) == (False, 3)
    assert not r.ok
    assert (
        registry.get_sample_value("killswitch_open_orders", {"account": "KRAKEN/JOHN"})
        == 3
    )


async def test_fanout_coalesces_trips_per_account_without_overlap(
    ems_sim: RunningSim, fanout: Fanout
) -> None:
    """Trips during a sweep fold into one follow-up; never two requests at once."""
    ems_sim.sim.set_fault("BINANCE", delay_seconds=0.2)
    first = fanout.submit(trip(("BINANCE",), "a"))[0]
    await ems_sim.sim.wait_for_requests(lambda rs: len(rs) >= 1)
    second = fanout.submit(trip(("BINANCE",), "b"))[0]
    third = fanout.submit(trip(("BINANCE",), "c"))[0]
    results = await asyncio.gather(first, second, third)
    assert len(cancels(ems_sim, "BINANCE")) == 2  # the running one + one follow-up
    assert results[1].accounts["BINANCE"] is results[2].accounts["BINANCE"]
    # never two in flight: each cancel-all was received after the previous verify
    paths = [r.path for r in ems_sim.sim.requests if r.exchange_id == "BINANCE"]
    assert paths == [CANCEL, "/v1/orders", CANCEL, "/v1/orders"]


async def test_fanout_drains_in_flight_sweep_on_exit(
    ems_sim: RunningSim, client: EmsClient, metrics: Metrics
) -> None:
    """Leaving the Fanout context waits for a slow in-flight cancel-all to complete."""
    ems_sim.sim.set_fault("COINBASE", delay_seconds=0.3)
    cfg_sweep = SweepConfig(deadline_seconds=5.0, verify=False)
    async with Fanout(client, RetryConfig(), cfg_sweep, metrics) as fanout:
        future, _ = fanout.submit(trip(("COINBASE",)))
    assert future.done()
    assert future.result().accounts["COINBASE"].outcome == "accepted"


def test_resolve_accounts_widens_on_unknown_or_empty() -> None:
    """Unknown or no accounts named means every account (fail safe)."""
    assert resolve_accounts(None, ACCOUNTS) == (ACCOUNTS, ())
    assert resolve_accounts(["BINANCE"], ACCOUNTS) == (("BINANCE",), ())
    wide, notes = resolve_accounts(["BINANCE", "NOPE"], ACCOUNTS)
    assert wide == ACCOUNTS
    assert "NOPE" in notes[0]
    assert resolve_accounts([], ACCOUNTS)[0] == ACCOUNTS
