"""Broken state at start-up: "assume tripped". A broken disk never stops a sweep."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ACCOUNTS, RunningSim
from tests.faults.conftest import (
    ONCALL_TOKEN,
    Daemons,
    audit_records,
    cancels,
    get_metrics,
    get_status,
    metric,
    persisted_trips,
    wait_until,
)
from tests.processes import DaemonProcess

_VALID_STATE = json.dumps(
    {
        "version": 1,
        "tripped": {
            "BINANCE": {"trip_id": "t1", "source": "signal", "reason": "r", "time": 1.0}
        },
        "pnl_peaks": {},
    }
).encode()


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def make(state_file: Path) -> None:
        state_file.write_bytes(data)

    return make


def _directory(state_file: Path) -> None:
    state_file.mkdir()


def _dangling_symlink(state_file: Path) -> None:
    state_file.symlink_to(state_file.parent / "unmounted" / "state.json")


BROKEN_STATES: dict[str, Callable[[Path], None]] = {
    "corrupt": _write_bytes(b'{"version": 1, "tripped": {"BIN'),
    "truncated": _write_bytes(_VALID_STATE[: len(_VALID_STATE) // 2]),
    "empty": _write_bytes(b""),
    "wrong_version": _write_bytes(b'{"version": 2, "tripped": {}, "pnl_peaks": {}}'),
    "wrong_shape": _write_bytes(b'{"version": 1, "tripped": ["BINANCE"]}'),
    "binary_garbage": _write_bytes(random.Random(1234).randbytes(4096)),  # noqa: S311
    "unreadable_directory": _directory,
}


async def _assert_assumed_tripped(
    daemon: DaemonProcess, sim: RunningSim, halt_file: Path
) -> None:
    [critical] = await daemon.wait_for_event("state_unreadable")
    assert critical["level"] == "critical"
    [done] = await daemon.wait_for_event("fanout_finished", source="startup")
    assert (done["ok"], done["failed"]) == (len(ACCOUNTS), 0)
    assert {r.exchange_id for r in cancels(sim.sim.requests)} == set(ACCOUNTS)
    await daemon.wait_ready()
    status = await get_status(daemon)
    assert status["state"] == "tripped"
    assert sorted(status["tripped_accounts"]) == sorted(ACCOUNTS)
    assert status["last_trip"]["source"] == "startup"
    await wait_until(halt_file.exists, "halt file written")


@pytest.mark.parametrize("kind", sorted(BROKEN_STATES))
async def test_broken_state_file_assumes_every_account_tripped_until_reset(
    kind: str, ems_sim: RunningSim, daemons: Daemons, tmp_path: Path
) -> None:
    """A state file that cannot be read: sweep all, stay latched until a reset."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    BROKEN_STATES[kind](state_dir / "state.json")
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await _assert_assumed_tripped(daemon, ems_sim, tmp_path / "halted")
    # Still latched once the sweep is over (no resweep configured): only a reset arms.
    assert (await get_status(daemon))["tripped_accounts"]
    status, body = await daemon.request(
        "POST", "/v1/reset", token=ONCALL_TOKEN, json_body={"reason": "state checked"}
    )
    assert (status, body["state"]) == (200, "armed")
    if kind == "unreadable_directory":
        # Nothing can replace a directory: the failure shows, the latch is armed.
        await daemon.wait_for_event("state_write_failed", file="state")
        assert (await get_status(daemon))["persistence_error"]
    else:
        await wait_until(
            lambda: persisted_trips(state_dir) == {}, "state.json rewritten, armed"
        )
    await wait_until(lambda: not (tmp_path / "halted").exists(), "halt file removed")


async def test_broken_state_dangling_symlink_assumes_every_account_tripped(
    ems_sim: RunningSim, daemons: Daemons, tmp_path: Path
) -> None:
    """A state.json symlink to nowhere cannot be read: assume every account tripped."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    _dangling_symlink(state_dir / "state.json")
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    status = await get_status(daemon)
    assert sorted(status["tripped_accounts"]) == sorted(ACCOUNTS)
    await _assert_assumed_tripped(daemon, ems_sim, tmp_path / "halted")


def _full_disk(tmp_path: Path) -> dict[str, Any]:
    """state.json's temp file and the audit log lead to /dev/full (ENOSPC for root)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / ".state.json.tmp").symlink_to("/dev/full")
    (state_dir / "audit.jsonl").symlink_to("/dev/full")
    return {}


def _halt_dir_is_a_file(tmp_path: Path) -> dict[str, Any]:
    """The halt file's parent is a regular file (ENOTDIR, whoever we are)."""
    (tmp_path / "run").write_text("not a directory\n")
    return {"halt_file": str(tmp_path / "run" / "halted")}


def _state_dir_is_a_file(tmp_path: Path) -> dict[str, Any]:
    """state_dir itself is a regular file: nothing in it can be read or written."""
    (tmp_path / "state").write_text("not a directory\n")
    return {}


WRITE_FAULTS: dict[str, tuple[Callable[[Path], dict[str, Any]], tuple[str, ...]]] = {
    "full_disk": (_full_disk, ("state", "audit")),
    "halt_dir_is_a_file": (_halt_dir_is_a_file, ("halt_file",)),
    "state_dir_is_a_file": (_state_dir_is_a_file, ("state", "audit")),
}


@pytest.mark.parametrize("fault", sorted(WRITE_FAULTS))
async def test_broken_state_dir_never_stops_a_sweep_and_shows_everywhere(
    fault: str, ems_sim: RunningSim, daemons: Daemons, tmp_path: Path
) -> None:
    """Unwritable state: the sweep runs; logs, status and metrics show the failure."""
    prepare, failing = WRITE_FAULTS[fault]
    overrides = prepare(tmp_path)
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS, **overrides))
    await daemon.wait_ready()
    daemon.send(signal.SIGUSR1)
    [done] = await daemon.wait_for_event("fanout_finished", source="signal")
    assert (done["ok"], done["failed"]) == (len(ACCOUNTS), 0)
    swept = cancels(ems_sim.sim.requests, since=done["seen_monotonic"])
    assert {r.exchange_id for r in swept} == set(ACCOUNTS)
    for file in failing:
        [first, *_] = await daemon.wait_for_event("state_write_failed", file=file)
        assert first["level"] == "error"
        assert first["error"]
    status = await get_status(daemon)
    assert status["state"] == "tripped"
    assert status["persistence_error"] or status["audit_error"]
    if {"state", "halt_file"} & set(failing):
        assert status["persistence_error"]
    if "audit" in failing:
        assert status["audit_error"]
    text = await get_metrics(daemon)
    for file in failing:
        errors = metric(text, "killswitch_state_write_errors_total", file=file)
        assert errors is not None
        assert errors >= 1
    if fault == "halt_dir_is_a_file":
        # The state write itself works: the trip becomes durable and is audited.
        await wait_until(
            lambda: set(persisted_trips(tmp_path / "state") or {}) == set(ACCOUNTS),
            "trip durable in state.json",
        )
        await wait_until(
            lambda: any(
                r["event"] == "state_write_failed"
                for r in audit_records(tmp_path / "state")
            ),
            "state_write_failed audited",
        )
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    status_code, _ = await daemon.request("GET", "/healthz")
    assert status_code == 200
    if fault != "halt_dir_is_a_file":
        halt_file = tmp_path / "halted"
        await wait_until(halt_file.exists, "halt file written despite the failures")


async def test_broken_state_dir_does_not_delay_the_halt_file(
    ems_sim: RunningSim, daemons: Daemons, tmp_path: Path
) -> None:
    """A full state disk must not hold back the halt file that trading systems read."""
    _full_disk(tmp_path)
    daemon = daemons.start(daemons.write(ems_sim.base_url, ACCOUNTS))
    await daemon.wait_ready()
    # Trip just after a failed write: the persister's retry pause has just begun.
    await daemon.wait_for_event("state_write_failed", file="state")
    tripped = time.monotonic()
    daemon.send(signal.SIGUSR1)
    halt_file = tmp_path / "halted"
    await wait_until(halt_file.exists, "halt file written", timeout_seconds=5)
    elapsed = time.monotonic() - tripped
    assert elapsed < 0.3, f"halt file written {elapsed:.3f}s after the trip"
