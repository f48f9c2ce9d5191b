"""End to end: the real daemon's PnL watcher trips, keeps its peak, and resets it."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ACCOUNTS, RunningSim, StartDaemon
from tests.processes import SECRETS, DaemonProcess

CANCEL = "/v1/orders/cancel/all"
MAX_DRAWDOWN = 150.0


def pnl_triggers(pnl_path: Path, **watcher: Any) -> dict[str, Any]:
    """A `triggers` section with one PnL watcher on `pnl_path`."""
    cfg = {
        "name": "desk", "path": str(pnl_path), "field": "pnl", "max_loss": 50000,
        "max_drawdown": MAX_DRAWDOWN, "stale_after_seconds": 0,
        "unreadable_grace_seconds": 30, "poll_interval_seconds": 0.02,
    }  # fmt: skip
    cfg.update(watcher)
    return {"signal": True, "pnl": [cfg]}


def write_pnl(path: Path, pnl: float) -> None:
    """Write the way a risk system does: a temporary file, then an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pnl": pnl}))
    tmp.replace(path)


async def pnl_metrics(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's killswitch_pnl* samples for watcher `desk`, by sample name."""
    status, text = await daemon.request("GET", "/metrics")
    assert status == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("killswitch_pnl")
        and sample.labels == {"watcher": "desk"}
    }


async def wait_for_pnl(daemon: DaemonProcess, pnl: float) -> dict[str, float]:
    """Poll /metrics (bounded) until the watcher has read `pnl`."""
    deadline = time.monotonic() + 10.0
    while (samples := await pnl_metrics(daemon)).get("killswitch_pnl") != pnl:
        assert time.monotonic() < deadline, f"pnl {pnl} never read: {samples}"
        await asyncio.sleep(0.02)
    return samples


def pnl_trips(daemon: DaemonProcess) -> list[dict[str, Any]]:
    latched = [e for e in daemon.events() if e.get("event") == "trip_latched"]
    return [e for e in latched if e.get("source") == "pnl"]


async def test_pnl_atomic_rename_with_breaching_value_trips_scoped_accounts(
    ems_sim: RunningSim, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A loss written by atomic rename cancels the watcher's accounts, only those."""
    pnl_path = tmp_path / "pnl.json"
    write_pnl(pnl_path, 0)
    scope = ["BINANCE", "KRAKEN/JOHN"]
    daemon = start_daemon(triggers=pnl_triggers(pnl_path, accounts=scope))
    await daemon.wait_ready()
    await wait_for_pnl(daemon, 0)
    write_pnl(pnl_path, -50000.5)
    [done] = await daemon.wait_for_event("fanout_finished", source="pnl")
    assert (done["ok"], done["failed"]) == (2, 0)
    cancelled = [str(r.exchange_id) for r in ems_sim.sim.requests if r.path == CANCEL]
    assert sorted(cancelled) == sorted(scope)
    [latched] = await daemon.wait_for_event("trip_latched", source="pnl")
    assert latched["actor"] == "pnl:desk"
    assert "loss limit" in latched["reason"]


async def test_pnl_restart_keeps_the_drawdown_peak(
    ems_sim: RunningSim, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The peak survives SIGTERM and a restart: a drop from it trips the new process."""
    pnl_path = tmp_path / "pnl.json"
    write_pnl(pnl_path, 1000)
    first = start_daemon(triggers=pnl_triggers(pnl_path))
    await first.wait_ready()
    await wait_for_pnl(first, 1000)
    first.send(signal.SIGTERM)
    assert await first.wait_exit() == 0
    # Written while no daemon runs: only the persisted peak can make it a drawdown.
    write_pnl(pnl_path, 1000 - MAX_DRAWDOWN - 1)

    second = start_daemon()
    [latched] = await second.wait_for_event("trip_latched", source="pnl")
    assert "drawdown limit" in latched["reason"]
    assert "peak 1000.0" in latched["reason"]
    await second.wait_for_event("fanout_finished", source="pnl")
    cancelled = [str(r.exchange_id) for r in ems_sim.sim.requests if r.path == CANCEL]
    assert sorted(cancelled) == sorted(ACCOUNTS)


async def test_pnl_reset_over_the_api_clears_the_peak(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """After POST /v1/reset the current value is the new peak; the old one is gone."""
    pnl_path = tmp_path / "pnl.json"
    write_pnl(pnl_path, 1000)
    daemon = start_daemon(triggers=pnl_triggers(pnl_path))
    await daemon.wait_ready()
    await wait_for_pnl(daemon, 1000)
    low = 1000 - MAX_DRAWDOWN - 1
    write_pnl(pnl_path, low)
    await daemon.wait_for_event("fanout_finished", source="pnl")

    status, body = await daemon.request(
        "POST", "/v1/reset", token=SECRETS["TEST_ONCALL_TOKEN"],
        json_body={"reason": "desk flat again"},
    )  # fmt: skip
    assert status == 200, body
    await daemon.wait_for_event("pnl_peaks_cleared")
    # The file is judged afresh: its current value is the new, persisted peak.
    state_path = tmp_path / "state" / "state.json"
    deadline = time.monotonic() + 10.0
    while json.loads(state_path.read_text())["pnl_peaks"] != {"desk": low}:
        assert time.monotonic() < deadline, state_path.read_text()
        await asyncio.sleep(0.02)
    # 50 below the old peak's limit, but within the drawdown of the new peak
    write_pnl(pnl_path, low - 50)
    samples = await wait_for_pnl(daemon, low - 50)
    assert samples["killswitch_pnl_headroom"] == MAX_DRAWDOWN - 50
    _, status_body = await daemon.request(
        "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
    )
    assert status_body["state"] == "armed"
    assert len(pnl_trips(daemon)) == 1
