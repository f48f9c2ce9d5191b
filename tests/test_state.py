"""State persistence: write_atomic, load_state, the Persister and the halt file."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from killswitch import state
from killswitch.errors import StateError
from killswitch.latch import TripRecord
from killswitch.state import (
    STATE_FILE_NAME,
    STATE_VERSION,
    PersistedState,
    Persister,
    load_state,
    write_atomic,
)

WAIT_SECONDS = 5.0
RECORD = TripRecord(trip_id="t1", source="signal", reason="SIGUSR1 received", time=1.5)
TRIPPED = PersistedState(
    tripped={"BINANCE": RECORD, "KRAKEN/JOHN": RECORD}, pnl_peaks={"desk": 1234.5}
)
Errors = list[tuple[str, Exception]]


def _tmp_of(path: Path) -> Path:
    """The temporary file write_atomic writes before renaming it over `path`."""
    return path.with_name(f".{path.name}.tmp")


# ---------------------------------------------------------------- write_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path):
    """The new content replaces the old one; no temporary file is left behind."""
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path):
    """A write that fails before the rename leaves the previous content intact."""
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    _tmp_of(path).mkdir()  # opening the temporary file fails, even for root
    with pytest.raises(IsADirectoryError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"


def test_write_atomic_overwrites_a_stale_temporary_file(tmp_path: Path):
    """A temporary file left by a crash is truncated, not appended to."""
    path = tmp_path / "state.json"
    _tmp_of(path).write_bytes(b"left over from a crash, much longer than the data")
    write_atomic(path, b"{}")
    assert path.read_bytes() == b"{}"
    assert not _tmp_of(path).exists()


# ------------------------------------------------------------------ load_state


def test_load_state_without_a_file_is_none(tmp_path: Path):
    """No state file (or no state_dir yet) means a first start: None."""
    assert load_state(tmp_path) is None
    assert load_state(tmp_path / "missing") is None


def _write_state(state_dir: Path, raw: bytes) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STATE_FILE_NAME).write_bytes(raw)


def _doc(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "version": STATE_VERSION,
        "tripped": {
            "BINANCE": {"trip_id": "t1", "source": "signal", "reason": "r", "time": 1.5}
        },
        "pnl_peaks": {"desk": 10.0},
    }
    doc.update(changes)
    return json.dumps(doc).encode()


def test_load_state_reads_what_the_persister_writes(tmp_path: Path):
    """A saved state loads back equal: records, accounts with a tag, PnL peaks."""
    _write_state(tmp_path, state._encode(TRIPPED))
    assert load_state(tmp_path) == TRIPPED


def test_load_state_accepts_a_file_without_pnl_peaks(tmp_path: Path):
    """pnl_peaks is optional: a state written before PnL peaks existed still loads."""
    doc = json.loads(_doc())
    del doc["pnl_peaks"]
    _write_state(tmp_path, json.dumps(doc).encode())
    loaded = load_state(tmp_path)
    assert loaded is not None
    assert (sorted(loaded.tripped), loaded.pnl_peaks) == (["BINANCE"], {})


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(_doc()[:-7], id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", id="binary"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b"null", id="null"),
        pytest.param(_doc(version=STATE_VERSION + 1), id="newer-version"),
        pytest.param(_doc(version="1"), id="version-as-text"),
        pytest.param(_doc(version=None), id="no-version"),
        pytest.param(_doc(tripped=["BINANCE"]), id="tripped-a-list"),
        pytest.param(_doc(tripped={"BINANCE": "yes"}), id="record-not-an-object"),
        pytest.param(_doc(tripped={"BINANCE": {"trip_id": "t"}}), id="record-fields"),
        pytest.param(
            _doc(
                tripped={
                    "BINANCE": {
                        "trip_id": "t",
                        "source": "signal",
                        "reason": "r",
                        "time": "noon",
                    }
                }
            ),
            id="record-time",
        ),
        pytest.param(_doc(pnl_peaks={"desk": "high"}), id="peak-not-a-number"),
        pytest.param(_doc(pnl_peaks=[1.0]), id="peaks-a-list"),
    ],
)
def test_load_state_corrupt_file_raises_state_error(tmp_path: Path, raw: bytes):
    """Any file that is not a complete state of this version is a StateError."""
    _write_state(tmp_path, raw)
    with pytest.raises(StateError, match=STATE_FILE_NAME):
        load_state(tmp_path)


def test_load_state_unreadable_file_raises_state_error(tmp_path: Path):
    """A state file that exists but cannot be read (a directory) is a StateError."""
    (tmp_path / STATE_FILE_NAME).mkdir()
    with pytest.raises(StateError, match="cannot read state"):
        load_state(tmp_path)


# -------------------------------------------------------------------- Persister


class Snapshots:
    """The state the Persister writes, changeable by the test, with a call count."""

    def __init__(self, value: PersistedState) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> PersistedState:
        self.calls += 1
        return self.value


def _persister(
    tmp_path: Path, snapshots: Snapshots, errors: Errors, *, halt: bool = True
) -> Persister:
    return Persister(
        tmp_path / "state",
        tmp_path / "run" / "halted" if halt else None,
        snapshots,
        lambda what, exc: errors.append((what, exc)),
    )


async def test_persister_writes_state_and_creates_the_halt_file(tmp_path: Path):
    """A save writes state.json and a halt file naming the tripped accounts."""
    snapshots = Snapshots(TRIPPED)
    errors: Errors = []
    async with _persister(tmp_path, snapshots, errors) as persister:
        assert await persister.wait_saved(persister.request_save(), WAIT_SECONDS)
        assert (persister.saves, persister.last_error, errors) == (1, None, [])
    assert load_state(tmp_path / "state") == TRIPPED
    halt = json.loads((tmp_path / "run" / "halted").read_text())
    assert halt == {"tripped": ["BINANCE", "KRAKEN/JOHN"]}


async def test_persister_removes_the_halt_file_once_nothing_is_tripped(tmp_path: Path):
    """When the last account is reset the halt file goes; the state file stays."""
    snapshots = Snapshots(TRIPPED)
    errors: Errors = []
    halt_file = tmp_path / "run" / "halted"
    async with _persister(tmp_path, snapshots, errors) as persister:
        assert await persister.wait_saved(persister.request_save(), WAIT_SECONDS)
        assert halt_file.exists()
        snapshots.value = PersistedState(pnl_peaks={"desk": 1.0})
        assert await persister.wait_saved(persister.request_save(), WAIT_SECONDS)
        assert not halt_file.exists()
        # Removing a halt file that is already gone is not an error.
        assert await persister.wait_saved(persister.request_save(), WAIT_SECONDS)
    assert load_state(tmp_path / "state") == PersistedState(pnl_peaks={"desk": 1.0})
    assert errors == []


async def test_persister_coalesces_requests_into_one_write(tmp_path: Path):
    """Many requests before the writer runs become one write of the latest state."""
    snapshots = Snapshots(PersistedState())
    errors: Errors = []
    async with _persister(tmp_path, snapshots, errors, halt=False) as persister:
        generations = [persister.request_save() for _ in range(10)]
        snapshots.value = TRIPPED
        assert generations == sorted(set(generations))
        assert await persister.wait_saved(generations[-1], WAIT_SECONDS)
        assert (persister.saves, snapshots.calls) == (1, 1)
    assert load_state(tmp_path / "state") == TRIPPED


async def test_persister_requests_during_a_write_become_one_more_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Requests made while a write runs are folded into exactly one follow-up write."""
    entered, release = threading.Event(), threading.Event()
    real_write = state.write_atomic

    def held_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        entered.set()
        release.wait(WAIT_SECONDS)
        real_write(path, data, mode=mode)

    monkeypatch.setattr(state, "write_atomic", held_write)
    snapshots = Snapshots(PersistedState())
    errors: Errors = []
    async with _persister(tmp_path, snapshots, errors, halt=False) as persister:
        first = persister.request_save()
        assert await asyncio.to_thread(entered.wait, WAIT_SECONDS)
        later = [persister.request_save() for _ in range(5)]
        snapshots.value = TRIPPED
        release.set()
        assert await persister.wait_saved(first, WAIT_SECONDS)
        assert await persister.wait_saved(later[-1], WAIT_SECONDS)
        assert persister.saves == 2
    assert load_state(tmp_path / "state") == TRIPPED


async def test_persister_reports_a_failing_disk_and_retries_until_it_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A failed write is reported once, retried, and the first success clears it."""
    monkeypatch.setattr(state, "RETRY_FAILED_WRITE_SECONDS", 0.01)
    blocker = _tmp_of(tmp_path / "state" / STATE_FILE_NAME)
    blocker.mkdir(parents=True)  # fails for root too: see test_write_atomic_failure...
    snapshots = Snapshots(TRIPPED)
    errors: Errors = []
    async with _persister(tmp_path, snapshots, errors, halt=False) as persister:
        generation = persister.request_save()
        await _wait_until(lambda: persister.failed_writes >= 2)
        assert len(errors) == 1  # the same failure again is not reported again
        assert not await persister.wait_saved(generation, 0.05)
        assert (persister.last_error or "").startswith("state: ")
        assert {what for what, _ in errors} == {"state"}
        blocker.rmdir()
        assert await persister.wait_saved(generation, WAIT_SECONDS)
        assert persister.last_error is None
    assert load_state(tmp_path / "state") == TRIPPED


async def test_persister_halt_file_failure_is_reported_separately(tmp_path: Path):
    """An unwritable halt file is its own error; state.json is still written."""
    blocker = tmp_path / "run"
    blocker.write_text("")  # the halt file's parent is a file: mkdir fails, root too
    snapshots = Snapshots(TRIPPED)
    errors: Errors = []
    async with _persister(tmp_path, snapshots, errors) as persister:
        persister.request_save()
        await _wait_until(lambda: bool(errors))
        assert (persister.last_error or "").startswith("halt_file: ")
    assert [what for what, _ in errors][:1] == ["halt_file"]
    assert isinstance(errors[0][1], OSError)
    assert load_state(tmp_path / "state") == TRIPPED


async def test_persister_writes_the_final_state_on_exit(tmp_path: Path):
    """A save requested just before shutdown is on disk once the Persister exits."""
    snapshots = Snapshots(PersistedState())
    errors: Errors = []
    async with _persister(tmp_path, snapshots, errors, halt=False) as persister:
        snapshots.value = TRIPPED
        persister.request_save()
    assert load_state(tmp_path / "state") == TRIPPED


async def _wait_until(predicate: Callable[[], bool]) -> None:
    """Poll (bounded) until `predicate()` holds."""
    async with asyncio.timeout(WAIT_SECONDS):
        while not predicate():
            await asyncio.sleep(0.005)
