"""End to end: the real `killswitch run` process against the simulator on loopback."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.conftest import ACCOUNTS, API_KEY, RunningSim, StartDaemon
from tests.processes import SECRETS

CANCEL = "/v1/orders/cancel/all"


def cancels(sim: RunningSim, account: str | None = None) -> list[Any]:
    return [
        r
        for r in sim.sim.requests
        if r.path == CANCEL and (account is None or r.exchange_id == account)
    ]


async def test_sigusr1_cancels_every_account_exactly_once(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """SIGUSR1: each account gets exactly one spec-valid cancel-all, then flat."""
    daemon = start_daemon()
    await daemon.wait_ready()
    daemon.send(signal.SIGUSR1)
    [done] = await daemon.wait_for_event("fanout_finished", source="signal")
    assert (done["ok"], done["failed"]) == (len(ACCOUNTS), 0)
    requests = cancels(ems_sim)
    assert sorted(r.exchange_id for r in requests) == sorted(ACCOUNTS)
    for r in requests:
        assert r.method == "POST"
        assert json.loads(r.body) == {"exchange_id": r.exchange_id}
        assert r.headers["X-CoinAPI-Key"] == API_KEY
    for account in ACCOUNTS:
        assert ems_sim.sim.open_orders(account) == []
    [latched] = await daemon.wait_for_event("trip_latched")
    assert latched["source"] == "signal"
    assert sorted(latched["accounts"]) == sorted(ACCOUNTS)
    assert (daemon.config_path.parent / "halted").exists()
    for secret in [*SECRETS.values()]:
        assert secret not in daemon.output()


async def test_response_timeouts_are_retried_without_delaying_other_accounts(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """Two leading response timeouts: 3 attempts there; the rest go out first."""
    daemon = start_daemon(
        retry={
            "max_attempts": 6,
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 0.2,
        }
    )
    await daemon.wait_ready()
    ems_sim.sim.fail_next(
        "KRAKEN/JOHN", 2, status=200, reject_reason="EXCHANGE_RESPONSE_TIMEOUT"
    )
    daemon.send(signal.SIGUSR1)
    await daemon.wait_for_event("fanout_finished")
    kraken = cancels(ems_sim, "KRAKEN/JOHN")
    assert len(kraken) == 3
    others = [r for r in cancels(ems_sim) if r.exchange_id != "KRAKEN/JOHN"]
    assert sorted(r.exchange_id for r in others) == sorted(
        set(ACCOUNTS) - {"KRAKEN/JOHN"}
    )
    # every other account's cancel-all was received before Kraken's first retry
    assert max(r.received_monotonic for r in others) < kraken[1].received_monotonic
    attempts = await daemon.wait_for_event(
        "cancel_all_attempted", 3, account="KRAKEN/JOHN"
    )
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["retryable_reject"] * 2 + ["accepted"]


async def test_bad_request_and_bad_key_are_not_retried(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """400 and 401 get exactly one attempt; the sweep reports those accounts failed."""
    daemon = start_daemon()
    await daemon.wait_ready()
    ems_sim.sim.fail_next("COINBASE", 1, status=400, reject_reason=None)
    ems_sim.sim.fail_next("BITSTAMP/2574", 1, status=401, reject_reason=None)
    daemon.send(signal.SIGUSR1)
    [done] = await daemon.wait_for_event("fanout_finished")
    assert (done["ok"], done["failed"]) == (2, 2)
    assert len(cancels(ems_sim, "COINBASE")) == 1
    assert len(cancels(ems_sim, "BITSTAMP/2574")) == 1
    failed = {
        e["account"]: e["outcome"]
        for e in await daemon.wait_for_event("account_not_flat", 2)
    }
    assert failed == {"COINBASE": "rejected", "BITSTAMP/2574": "auth_error"}


async def test_hung_account_times_out_and_is_retried_within_deadline(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """A hung account is timed out, retried, and given up on at the sweep deadline."""
    daemon = start_daemon(
        ems={
            "default": {
                "base_url": ems_sim.base_url,
                "api_key_env": "TEST_COINAPI_KEY",
                "timeout_seconds": 0.3,
            }
        },
        sweep={
            "deadline_seconds": 1.5,
            "verify": True,
            "verify_attempts": 1,
            "resweep_interval_seconds": 0,
        },
    )
    await daemon.wait_ready()
    ems_sim.sim.set_fault("BINANCE", hang=True)
    daemon.send(signal.SIGUSR1)
    [done] = await daemon.wait_for_event("fanout_finished")
    assert done["failed"] == 1
    assert done["duration_seconds"] < 1.5 + 0.5
    hung = await daemon.wait_for_event("cancel_all_attempted", account="BINANCE")
    assert len(hung) >= 2
    assert {h["outcome"] for h in hung} == {"timeout"}
    assert len(cancels(ems_sim, "BINANCE")) == len(hung)


async def test_orders_surviving_cancel_are_recancelled_until_flat(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """Orders surviving one cancel-all are re-cancelled; status shows it flat."""
    daemon = start_daemon()
    await daemon.wait_ready()
    ems_sim.sim.set_fault("KRAKEN/JOHN", survive_cancels=1)
    daemon.send(signal.SIGUSR1)
    await daemon.wait_for_event("fanout_finished")
    assert len(cancels(ems_sim, "KRAKEN/JOHN")) == 2
    status, body = await daemon.request(
        "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
    )
    assert status == 200
    kraken = body["accounts"]["KRAKEN/JOHN"]
    assert (kraken["tripped"], kraken["flat"], kraken["open_orders"]) == (True, True, 0)


async def test_restart_with_tripped_state_sweeps_again_without_a_trigger(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """A latched trip survives a restart: the new process sweeps at start-up."""
    first = start_daemon()
    await first.wait_ready()
    status, _ = await first.request(
        "POST",
        "/v1/trip",
        token=SECRETS["TEST_TRIP_TOKEN"],
        json_body={"reason": "x", "accounts": ["COINBASE"]},
    )
    assert status == 202
    await first.wait_for_event("fanout_finished")
    first.send(signal.SIGTERM)
    assert await first.wait_exit() == 0
    ems_sim.sim.reset()

    second = start_daemon()
    [done] = await second.wait_for_event("fanout_finished", source="startup")
    assert done["ok"] == 1
    assert [r.exchange_id for r in cancels(ems_sim)] == ["COINBASE"]
    status, body = await second.request(
        "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
    )
    assert body["tripped_accounts"] == ["COINBASE"]


async def test_corrupt_state_file_means_every_account_tripped(
    ems_sim: RunningSim, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """An unreadable state file: start, sweep all, stay latched, and say so loudly."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_bytes(b'{"version": 1, "tripped": {"BIN')
    daemon = start_daemon()
    [critical] = await daemon.wait_for_event("state_unreadable")
    assert critical["level"] == "critical"
    [done] = await daemon.wait_for_event("fanout_finished", source="startup")
    assert done["ok"] == len(ACCOUNTS)
    assert sorted(r.exchange_id for r in cancels(ems_sim)) == sorted(ACCOUNTS)
    _, body = await daemon.request(
        "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
    )
    assert sorted(body["tripped_accounts"]) == sorted(ACCOUNTS)


async def test_sigterm_lets_a_slow_cancel_complete_then_exits_zero(
    ems_sim: RunningSim, start_daemon: StartDaemon
) -> None:
    """SIGTERM while one account answers slowly: that request completes, then exit 0."""
    daemon = start_daemon()
    await daemon.wait_ready()
    ems_sim.sim.set_fault("COINBASE", delay_seconds=0.8)
    daemon.send(signal.SIGUSR1)
    await ems_sim.sim.wait_for_requests(
        lambda rs: any(r.path == CANCEL and r.exchange_id == "COINBASE" for r in rs)
    )
    daemon.send(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    events = [e["event"] for e in daemon.events()]
    [slow] = [
        e
        for e in daemon.events()
        if e.get("event") == "cancel_all_attempted" and e["account"] == "COINBASE"
    ]
    assert slow["outcome"] == "accepted"
    assert events.index("shutdown_requested") < events.index("stopped")
    assert ems_sim.sim.open_orders("COINBASE") == []
    state = json.loads((daemon.config_path.parent / "state" / "state.json").read_text())
    assert sorted(state["tripped"]) == sorted(ACCOUNTS)
