"""The real daemon's audit log (state_dir/audit.jsonl), and failing state writes."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from killswitch.audit import AUDIT_FILE_NAME, AuditLog
from killswitch.state import STATE_FILE_NAME, write_atomic
from tests.conftest import ACCOUNTS, RunningSim, StartDaemon
from tests.processes import SECRETS, DaemonProcess

CANCEL = "/v1/orders/cancel/all"
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.02
Records = list[dict[str, Any]]


def read_audit(path: Path) -> Records:
    """Every record of an audit log; each line must be one JSON object."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def wait_audit(path: Path, predicate: Callable[[Records], bool]) -> Records:
    """Poll the audit log (bounded) until `predicate(records)` holds."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate(records := read_audit(path)):
        assert time.monotonic() < deadline, f"audit log never matched: {records}"
        await asyncio.sleep(POLL_SECONDS)
    return records


def events(records: Records, event: str) -> Records:
    """The records of one event type."""
    return [r for r in records if r["event"] == event]


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from an exposition page."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def test_audit_log_records_trips_sweeps_reset_and_reload(
    start_daemon: StartDaemon, tmp_path: Path
):
    """One record per trip, sweep result, reset and reload, with actor and outcome."""
    audit_path = tmp_path / "state" / AUDIT_FILE_NAME
    daemon = start_daemon()
    await daemon.wait_ready()
    status, reply = await daemon.request(
        "POST", "/v1/trip", token=SECRETS["TEST_TRIP_TOKEN"],
        json_body={"reason": "desk loss", "accounts": ["COINBASE"]},
    )  # fmt: skip
    assert status == 202, reply
    await daemon.wait_for_event("fanout_finished", source="webhook")
    daemon.send(signal.SIGUSR1)
    await daemon.wait_for_event("fanout_finished", source="signal")
    status, _ = await daemon.request(
        "POST", "/v1/reset", token=SECRETS["TEST_ONCALL_TOKEN"],
        json_body={"reason": "all clear"},
    )  # fmt: skip
    assert status == 200
    daemon.send(signal.SIGHUP)
    await daemon.wait_for_event("config_reloaded")

    records = await wait_audit(audit_path, lambda rs: bool(events(rs, "reload")))
    assert all(isinstance(r["time"], float) for r in records)
    webhook, by_signal = events(records, "trip")
    assert (webhook["source"], webhook["reason"], webhook["accounts"]) == (
        "webhook", "desk loss", ["COINBASE"],
    )  # fmt: skip
    assert webhook["actor"] == "risk"
    assert webhook["trip_id"] == reply["trip_id"]
    assert (by_signal["source"], by_signal["actor"]) == ("signal", "signal")
    assert sorted(by_signal["accounts"]) == sorted(ACCOUNTS)
    sweeps = {r["trip_id"]: r for r in events(records, "sweep_result")}
    assert set(sweeps) == {webhook["trip_id"], by_signal["trip_id"]}
    assert sorted(sweeps[by_signal["trip_id"]]["accounts"]) == sorted(ACCOUNTS)
    for sweep in sweeps.values():
        assert sweep["failed"] == 0
        for result in sweep["accounts"].values():
            assert (result["outcome"], result["flat"], result["open_orders"]) == (
                "accepted", True, 0,
            )  # fmt: skip
    [reset] = events(records, "reset")
    assert (reset["actor"], reset["reason"]) == ("oncall", "all clear")
    assert sorted(reset["was_tripped"]) == sorted(ACCOUNTS)
    [reload] = events(records, "reload")
    assert reload["config"] == str(daemon.config_path)
    order = [r["event"] for r in records if r["event"] in {"trip", "reset", "reload"}]
    assert order == ["trip", "trip", "reset", "reload"]
    assert (audit_path.stat().st_mode & 0o777) == 0o600


async def test_audit_log_is_appended_across_restarts(
    start_daemon: StartDaemon, tmp_path: Path
):
    """A restart appends to the audit log; the first run's records stay as written."""
    audit_path = tmp_path / "state" / AUDIT_FILE_NAME
    first = start_daemon()
    await first.wait_ready()
    first.send(signal.SIGUSR1)
    await first.wait_for_event("fanout_finished")
    first.send(signal.SIGTERM)
    assert await first.wait_exit() == 0
    before = audit_path.read_text()
    assert [r["event"] for r in read_audit(audit_path)][:1] == ["started"]

    second = start_daemon()
    await second.wait_for_event("fanout_finished", source="startup")
    records = await wait_audit(
        audit_path, lambda rs: len(events(rs, "sweep_result")) == 2
    )
    assert audit_path.read_text().startswith(before)
    assert len(events(records, "started")) == 2
    assert [r["source"] for r in events(records, "trip")] == ["signal", "startup"]


def _break_state_writes(state_dir: Path) -> None:
    """Make every write of state.json fail, for root too.

    Permission bits do not stop root (CI runs tests as root), so the temporary file
    that write_atomic() writes and renames is made a directory: opening it for
    writing fails with EISDIR for every user, while state.json itself stays absent,
    so start-up reads "no state yet" exactly as on a read-only disk.
    """
    state_dir.mkdir(parents=True)
    (state_dir / f".{STATE_FILE_NAME}.tmp").mkdir()
    with pytest.raises(IsADirectoryError):  # the trick still matches write_atomic
        write_atomic(state_dir / STATE_FILE_NAME, b"{}")


def _break_audit_writes(state_dir: Path) -> None:
    """Make every append to audit.jsonl fail, for root too: it is a directory."""
    (state_dir / AUDIT_FILE_NAME).mkdir()


def _unwritable_halt_file(tmp_path: Path) -> Path:
    """A halt file whose parent is a regular file: mkdir fails, for root too."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "halted"


async def _trip_and_check_the_sweep(daemon: DaemonProcess, ems_sim: RunningSim) -> None:
    """SIGUSR1 sweeps every account, flat, whatever the disk does."""
    await daemon.wait_ready()
    daemon.send(signal.SIGUSR1)
    [done] = await daemon.wait_for_event("fanout_finished", source="signal")
    assert (done["ok"], done["failed"]) == (len(ACCOUNTS), 0)
    swept = [str(r.exchange_id) for r in ems_sim.sim.requests if r.path == CANCEL]
    assert sorted(swept) == sorted(ACCOUNTS)
    for account in ACCOUNTS:
        assert ems_sim.sim.open_orders(account) == []


async def test_state_write_failure_never_stops_a_sweep_and_is_audited(
    ems_sim: RunningSim, start_daemon: StartDaemon, tmp_path: Path
):
    """State and halt file unwritable: the sweep runs; logs, audit, status, metrics say.

    See _break_state_writes and _unwritable_halt_file for why this fails as root too.
    """
    state_dir = tmp_path / "state"
    _break_state_writes(state_dir)
    halt_file = _unwritable_halt_file(tmp_path)
    daemon = start_daemon(state_dir=str(state_dir), halt_file=str(halt_file))
    await _trip_and_check_the_sweep(daemon, ems_sim)

    failed = await daemon.wait_for(
        lambda evs: (
            {"state", "halt_file"}
            <= {e.get("file") for e in evs if e.get("event") == "state_write_failed"}
        )
    )
    assert all(
        e["level"] == "error" for e in failed if e["event"] == "state_write_failed"
    )
    records = await wait_audit(
        state_dir / AUDIT_FILE_NAME,
        lambda rs: (
            {"state", "halt_file"}
            <= {r.get("file") for r in events(rs, "state_write_failed")}
        ),
    )
    assert events(records, "trip")  # the audit log itself still works
    status, body = await daemon.request(
        "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
    )
    assert status == 200
    assert body["state"] == "tripped"
    assert body["persistence_error"]
    assert body["audit_error"] is None
    _, page = await daemon.request("GET", "/metrics")
    for file in ("state", "halt_file"):
        count = metric(page, "killswitch_state_write_errors_total", file=file)
        assert count is not None
        assert count >= 1, file
    assert metric(page, "killswitch_state_write_errors_total", file="audit") == 0
    assert not (state_dir / STATE_FILE_NAME).exists()


async def test_audit_write_failure_never_stops_a_sweep_and_is_visible(
    ems_sim: RunningSim, start_daemon: StartDaemon, tmp_path: Path
):
    """Nothing can be written at all: the sweep runs; logs, status and metrics say so.

    See _break_state_writes, _break_audit_writes and _unwritable_halt_file for why
    this fails as root too.
    """
    state_dir = tmp_path / "state"
    _break_state_writes(state_dir)
    _break_audit_writes(state_dir)
    halt_file = _unwritable_halt_file(tmp_path)
    daemon = start_daemon(state_dir=str(state_dir), halt_file=str(halt_file))
    await _trip_and_check_the_sweep(daemon, ems_sim)

    await daemon.wait_for(
        lambda evs: (
            {"state", "halt_file", "audit"}
            <= {e.get("file") for e in evs if e.get("event") == "state_write_failed"}
        )
    )
    status, body = await daemon.request(
        "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
    )
    assert status == 200
    assert body["persistence_error"]
    assert body["audit_error"]
    _, page = await daemon.request("GET", "/metrics")
    for file in ("state", "halt_file", "audit"):
        count = metric(page, "killswitch_state_write_errors_total", file=file)
        assert count is not None
        assert count >= 1, file
    daemon.send(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_audit_log_append_from_a_worker_thread_is_written(tmp_path: Path):
    """Write-error callbacks run in threads; their records still reach the file."""
    path = tmp_path / AUDIT_FILE_NAME
    asyncio.get_running_loop().set_debug(True)  # flags loop calls from other threads
    async with AuditLog(path, lambda what, exc: None) as audit:
        audit.append("started")
        await wait_audit(path, bool)  # the writer now waits for the next record
        worker = threading.Thread(
            target=audit.append, args=("state_write_failed",), kwargs={"file": "state"}
        )
        worker.start()
        await asyncio.to_thread(worker.join)
        records = await wait_audit(path, lambda rs: len(rs) == 2)
    assert [r["event"] for r in records] == ["started", "state_write_failed"]


async def test_audit_log_flushes_queued_records_on_exit(tmp_path: Path):
    """Records appended just before the log closes are on disk once it has closed."""
    path = tmp_path / "nested" / AUDIT_FILE_NAME
    async with AuditLog(path, lambda what, exc: None) as audit:
        for n in range(100):
            audit.append("trip", n=n)
    assert [r["n"] for r in read_audit(path)] == list(range(100))
    assert (path.stat().st_mode & 0o777) == 0o600


async def test_audit_log_reports_a_failing_disk_without_raising(tmp_path: Path):
    """An unwritable audit log calls on_error, sets last_error, and counts the drops."""
    path = tmp_path / AUDIT_FILE_NAME
    path.mkdir()
    errors: list[tuple[str, Exception]] = []
    async with AuditLog(path, lambda what, exc: errors.append((what, exc))) as audit:
        audit.append("trip")
    assert [what for what, _ in errors] == ["audit"]
    assert isinstance(errors[0][1], IsADirectoryError)
    assert audit.last_error is not None
    assert audit.dropped == 1
