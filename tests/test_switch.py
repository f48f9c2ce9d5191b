"""Switch: latch, persistence, coalescing and reset, on the simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from killswitch.audit import AUDIT_FILE_NAME, AuditLog
from killswitch.config import Config
from killswitch.fanout import Fanout
from killswitch.latch import Latch
from killswitch.metrics import Metrics
from killswitch.state import PersistedState, Persister, load_state
from killswitch.switch import Switch
from killswitch.triggers import TripRequest
from tests.conftest import ACCOUNTS, RunningSim


def _no_write_errors(what: str, exc: Exception) -> None:
    msg = f"{what}: {exc}"
    raise AssertionError(msg)


@pytest.fixture
async def switch(
    fanout: Fanout, config: Config, metrics: Metrics, tmp_path: Path
) -> AsyncIterator[Switch]:
    latch = Latch(config.account_ids)

    def snapshot() -> PersistedState:
        return PersistedState(
            tripped={
                a: r
                for a in latch.tripped_accounts
                if (r := latch.record(a)) is not None
            }
        )

    async with (
        AuditLog(config.state_dir / AUDIT_FILE_NAME, _no_write_errors) as audit,
        Persister(
            config.state_dir, config.halt_file, snapshot, _no_write_errors
        ) as persister,
    ):
        s = Switch(latch, fanout, metrics, audit, persister, config.account_ids)
        async with s:
            yield s


async def test_switch_trip_is_latched_persisted_and_counted(
    switch: Switch, config: Config, registry: CollectorRegistry
) -> None:
    """A trip latches its accounts, reaches disk, and moves the trip metrics."""
    receipt = switch.trip(
        TripRequest(source="webhook", reason="r", accounts=("BINANCE",), actor="risk")
    )
    assert receipt.accounts == ("BINANCE",)
    assert switch.latch.tripped_accounts == ("BINANCE",)
    assert await switch.wait_persisted(receipt, 5.0)
    state = load_state(config.state_dir)
    assert state is not None
    assert state.tripped["BINANCE"].trip_id == receipt.trip_id
    assert config.halt_file is not None
    assert json.loads(config.halt_file.read_text()) == {"tripped": ["BINANCE"]}
    assert (
        registry.get_sample_value("killswitch_trips_total", {"source": "webhook"}) == 1
    )
    assert registry.get_sample_value("killswitch_tripped", {"account": "BINANCE"}) == 1


async def test_switch_unknown_account_trips_everything(switch: Switch) -> None:
    """Fail safe: a trip naming an unknown account covers every account."""
    receipt = switch.trip(TripRequest(source="webhook", reason="r", accounts=("NOPE",)))
    assert receipt.accounts == ACCOUNTS
    assert "NOPE" in receipt.notes[0]


async def test_switch_trip_during_sweep_is_coalesced(
    ems_sim: RunningSim, switch: Switch
) -> None:
    """A trip for an account being swept is reported coalesced, not sent twice."""
    ems_sim.sim.set_fault("COINBASE", delay_seconds=0.2)
    switch.trip(TripRequest(source="signal", reason="a"))
    second = switch.trip(
        TripRequest(source="signal", reason="b", accounts=("COINBASE",))
    )
    assert second.coalesced == ("COINBASE",)


async def test_switch_reset_rearms_and_reports_sweeps_in_flight(
    ems_sim: RunningSim, switch: Switch, config: Config
) -> None:
    """Reset re-arms at once; a sweep in flight is named and runs to its end."""
    ems_sim.sim.set_fault("KRAKEN/JOHN", delay_seconds=0.3)
    switch.trip(TripRequest(source="signal", reason="a"))
    receipt = switch.reset(None, "drill over", "oncall")
    assert set(receipt.reset) == set(ACCOUNTS)
    assert "KRAKEN/JOHN" in receipt.still_sweeping
    assert not switch.latch.is_any_tripped
    await ems_sim.sim.wait_for_requests(
        lambda rs: any(r.exchange_id == "KRAKEN/JOHN" and r.method == "GET" for r in rs)
    )
    assert ems_sim.sim.open_orders("KRAKEN/JOHN") == []
