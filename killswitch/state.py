"""Persist the latch, PnL peaks and halt file (atomic, fsynced), off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

from killswitch.errors import StateError
from killswitch.latch import TripRecord

log = structlog.get_logger()

STATE_FILE_NAME = "state.json"
STATE_VERSION = 1
# A failed write (full or read-only disk) is tried again after this long.
RETRY_FAILED_WRITE_SECONDS = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistedState:
    """What survives a restart: latched accounts and PnL peaks."""

    tripped: dict[str, TripRecord] = field(default_factory=dict)
    pnl_peaks: dict[str, float] = field(default_factory=dict)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask (systemd UMask=0077) must not narrow it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


def load_state(state_dir: Path) -> PersistedState | None:
    """Read the state file; None when there is none yet.

    Raises:
        StateError: the file exists but cannot be read or parsed (callers
            must then assume every account tripped).
    """
    path = state_dir / STATE_FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        if path.is_symlink():  # state on a volume that is not mounted: not "no state"
            msg = f"{path}: dangling symlink to {path.readlink()}"
            raise StateError(msg) from exc
        return None
    except OSError as exc:
        msg = f"{path}: cannot read state: {exc.strerror or exc}"
        raise StateError(msg) from exc
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            msg = f"expected an object with version {STATE_VERSION}"
            raise TypeError(msg)  # noqa: TRY301 - one place turns every shape error into StateError
        tripped = {
            str(account): TripRecord(
                trip_id=str(rec["trip_id"]),
                source=str(rec["source"]),
                reason=str(rec["reason"]),
                time=float(rec["time"]),
            )
            for account, rec in doc["tripped"].items()
        }
        peaks = {str(k): float(v) for k, v in doc.get("pnl_peaks", {}).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        msg = f"{path}: corrupt state ({type(exc).__name__}: {exc})"
        raise StateError(msg) from exc
    return PersistedState(tripped=tripped, pnl_peaks=peaks)


def _encode(state: PersistedState) -> bytes:
    doc = {
        "version": STATE_VERSION,
        "tripped": {a: asdict(rec) for a, rec in state.tripped.items()},
        "pnl_peaks": state.pnl_peaks,
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


class Persister:
    """Writes the latest state snapshot and the halt file whenever asked, in a thread.

    Saves coalesce: many requests while a write runs become one more write.
    A failing disk never raises out of here: `on_error` is told and the
    write is tried again.
    """

    def __init__(
        self,
        state_dir: Path,
        halt_file: Path | None,
        snapshot: Callable[[], PersistedState],
        on_error: Callable[[str, Exception], None],
    ) -> None:
        self._path = state_dir / STATE_FILE_NAME
        self._halt_file = halt_file
        self._snapshot = snapshot
        self._on_error = on_error
        self._dirty = asyncio.Event()
        self._tg = asyncio.TaskGroup()
        self._stopping = False
        self.last_error: str | None = None
        self.saves = 0
        self.failed_writes = 0
        # Generations let a caller learn when the state it changed is durable.
        self._requested_generation = 0
        self._saved_generation = 0
        self._saved = asyncio.Condition()

    def request_save(self) -> int:
        """Ask for the current state to be written soon; never blocks.

        Returns the generation to pass to `wait_saved`.
        """
        self._requested_generation += 1
        self._dirty.set()
        return self._requested_generation

    async def wait_saved(self, generation: int, timeout_seconds: float) -> bool:
        """True once a write covering `generation` succeeded; False on timeout."""
        try:
            async with asyncio.timeout(timeout_seconds), self._saved:
                await self._saved.wait_for(lambda: self._saved_generation >= generation)
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> Persister:
        await self._tg.__aenter__()
        self._tg.create_task(self._run(), name="state.persister")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        self._dirty.set()
        await self._tg.__aexit__(exc_type, exc, tb)

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            generation = self._requested_generation
            ok = await asyncio.to_thread(self._write, self._snapshot())
            if ok:
                async with self._saved:
                    self._saved_generation = generation
                    self._saved.notify_all()
            if self._stopping:
                return
            if not ok:
                # Retry soon, or at once when the state changes (a new trip).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_FAILED_WRITE_SECONDS):
                        await self._dirty.wait()
                self._dirty.set()

    def _write(self, state: PersistedState) -> bool:
        ok = True
        # The halt file first: trading systems stop sending orders on seeing it.
        if self._halt_file is not None:
            try:
                self._sync_halt_file(self._halt_file, state)
            except OSError as exc:
                ok = False
                self._fail("halt_file", exc)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path, _encode(state))
            self.saves += 1
        except OSError as exc:
            ok = False
            self._fail("state", exc)
        if ok and self.last_error is not None:
            log.warning("state_write_recovered", previous_error=self.last_error)
            self.last_error = None
        return ok

    def _fail(self, what: str, exc: OSError) -> None:
        self.failed_writes += 1
        error = f"{what}: {exc.strerror or exc}"
        # Retried every second: report each distinct failure once, not each retry.
        if error != self.last_error:
            self._on_error(what, exc)
        self.last_error = error

    @staticmethod
    def _sync_halt_file(halt_file: Path, state: PersistedState) -> None:
        if state.tripped:
            halt_file.parent.mkdir(parents=True, exist_ok=True)
            body = {"tripped": sorted(state.tripped)}
            # Trading systems (other users) read it: world-readable on purpose.
            write_atomic(halt_file, json.dumps(body).encode() + b"\n", mode=0o644)
        else:
            halt_file.unlink(missing_ok=True)
