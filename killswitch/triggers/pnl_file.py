"""Poll PnL files; trip on a loss or drawdown breach, a stale or an unreadable file.

Each watcher polls one file. A poll is one `stat` in a thread; the file is read
(in the same thread) only when its identity or content may have changed: a new
inode or device (atomic rename) or a new mtime or size (in-place write). Garbled
content is never a loss signal: it is "unreadable", and trips only once it has
stayed so for `unreadable_grace_seconds` (SPEC principle 1: when in doubt, trip).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import structlog

from killswitch.config import PnlWatcherConfig
from killswitch.errors import TriggerError
from killswitch.metrics import Metrics
from killswitch.triggers import TripRequest

log = structlog.get_logger()

# A PnL file holds a number or a small JSON object; anything bigger is garbage.
MAX_FILE_BYTES = 64 * 1024
_BARE_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", re.ASCII)

Condition = Literal["breach", "stale", "unreadable"]
_FileKey = tuple[object, ...]


class TripSink(Protocol):
    """What a watcher trips: the Switch (tests pass a small fake)."""

    accounts: tuple[str, ...]

    def trip(self, request: TripRequest) -> object:
        """Latch and sweep the requested accounts; never blocks."""


@dataclass(frozen=True, slots=True)
class PnlReading:
    """One parsed PnL file: the value and, if the file carries one, its timestamp."""

    pnl: float
    timestamp: float | None  # epoch seconds; None means the file's mtime counts


def parse_pnl(data: bytes, field: str) -> PnlReading:
    """Parse a bare number (`-1234.5`) or a JSON object holding it under `field`.

    Raises:
        TriggerError: the content is no finite PnL: empty, garbled, half-written,
            NaN/inf, a bool, a missing field or a bad `timestamp`.
    """
    if len(data) > MAX_FILE_BYTES:
        msg = f"larger than {MAX_FILE_BYTES} bytes"
        raise TriggerError(msg)
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        msg = f"not UTF-8 text (byte {exc.start})"
        raise TriggerError(msg) from exc
    if not text:
        msg = "empty file"
        raise TriggerError(msg)
    if _BARE_NUMBER.fullmatch(text):
        return PnlReading(_finite(float(text), "value"), None)
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        msg = f"neither a number nor a JSON object ({str(exc)[:80]})"
        raise TriggerError(msg) from exc
    if not isinstance(doc, dict):
        msg = f"expected a number or a JSON object, got {type(doc).__name__}"
        raise TriggerError(msg)
    if field not in doc:
        msg = f"field {field!r} missing"
        raise TriggerError(msg)
    pnl = _number(doc[field], field)
    if "timestamp" not in doc:
        return PnlReading(pnl, None)
    return PnlReading(pnl, _timestamp(doc["timestamp"]))


def _reject_constant(name: str) -> float:
    msg = f"{name} is not a number"
    raise ValueError(msg)


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        msg = f"{name} {value} is not finite"
        raise TriggerError(msg)
    return value


def _number(value: object, name: str) -> float:
    # bool is an int subclass; `true` is no PnL.
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} is {type(value).__name__}, not a number"
        raise TriggerError(msg)
    try:
        return _finite(float(value), name)
    except OverflowError as exc:
        msg = f"{name} is out of range"
        raise TriggerError(msg) from exc


def _timestamp(value: object) -> float:
    if not isinstance(value, str):
        return _number(value, "timestamp")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        msg = f"timestamp {value[:40]!r} is not ISO 8601"
        raise TriggerError(msg) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive means UTC, never local time
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What one look at the file found."""

    key: _FileKey | None  # identifies the version; None: changing while read
    data: bytes | None = None  # None: not read (unchanged, or an error)
    mtime: float = 0.0
    error: str | None = None


def _key(st: os.stat_result) -> _FileKey:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _look(path: Path, known: _FileKey | None) -> _Snapshot:
    """Stat the file; read it unless it is still the `known` version. In a thread."""
    try:
        if _key(path.stat()) == known:
            return _Snapshot(known)
        with path.open("rb") as f:
            before = os.fstat(f.fileno())
            data = f.read(MAX_FILE_BYTES + 1)
            after = os.fstat(f.fileno())
    except OSError as exc:
        why = "file missing" if isinstance(exc, FileNotFoundError) else str(exc)
        return _Snapshot(("error", why), error=why)
    if _key(before) != _key(after):
        return _Snapshot(None)  # written to while we read: look again next poll
    # The key of the inode we read, not of the path: a rename after our stat
    # must show up as a new version on the next poll.
    return _Snapshot(_key(before), data, before.st_mtime_ns / 1e9)


class PnlWatcher:
    """Polls one PnL file; trips its accounts on a breach, a stale or a garbled file."""

    def __init__(
        self,
        cfg: PnlWatcherConfig,
        switch: TripSink,
        metrics: Metrics,
        peaks: dict[str, float],
        request_save: Callable[[], object],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._switch = switch
        self._metrics = metrics
        self._peaks = peaks  # shared with the persister; the one copy of the peak
        self._request_save = request_save
        self._clock = clock
        self._wall_clock = wall_clock
        self._key: _FileKey | None = None
        self._data: bytes | None = None
        # Re-read once after each change: a same-size rewrite within one coarse
        # mtime tick leaves the stat unchanged.
        self._recheck = False
        self._epoch = 0  # bumped by reset(); a read started before it is dropped
        self._breaches = 0
        self._tripped: set[Condition] = set()
        self._unreadable: tuple[float, str] | None = None  # since (clock), why
        self._fresh_at = wall_clock()  # the stale clock runs from start-up
        self._has_value = False
        # The series exists at 0 from the start, so rate() and alerts see it.
        metrics.pnl_read_errors.labels(watcher=cfg.name)

    @property
    def name(self) -> str:
        """The watcher's configured name."""
        return self.cfg.name

    async def run(self) -> None:
        """Poll until cancelled."""
        self._fresh_at = self._wall_clock()
        while True:
            await self.poll()
            await asyncio.sleep(self.cfg.poll_interval_seconds)

    async def poll(self) -> None:
        """Look at the file once, read it if it changed, then apply every rule."""
        epoch = self._epoch
        known = None if self._recheck else self._key
        snapshot = await asyncio.to_thread(_look, self.cfg.path, known)
        if epoch == self._epoch:
            self._take(snapshot)
        self._check_clock_rules()

    def reset(self) -> None:
        """Forget the peak, the breach count and what tripped; judge the file afresh."""
        self._peaks.pop(self.name, None)
        self._breaches = 0
        self._tripped.clear()
        self._key, self._data, self._recheck = None, None, False
        self._epoch += 1

    def _take(self, snapshot: _Snapshot) -> None:
        if snapshot.key is None:
            return
        is_new = snapshot.key != self._key or (
            snapshot.data is not None and snapshot.data != self._data
        )
        self._recheck = is_new and snapshot.data is not None
        if not is_new:
            return
        self._key, self._data = snapshot.key, snapshot.data
        if snapshot.data is None:
            self._unreadable_version(snapshot.error or "unreadable")
            return
        try:
            reading = parse_pnl(snapshot.data, self.cfg.field)
        except TriggerError as exc:
            self._unreadable_version(str(exc))
            return
        self._judge(reading, snapshot.mtime)

    def _unreadable_version(self, why: str) -> None:
        # Counted once per distinct bad version (a new stat key, content or
        # error), not on every poll of the same unchanged bad file: the counter
        # then says how many bad versions there were, whatever the poll rate.
        self._metrics.pnl_read_errors.labels(watcher=self.name).inc()
        if self._unreadable is not None:
            self._unreadable = (self._unreadable[0], why)
            return
        self._unreadable = (self._clock(), why)
        log.warning(
            "pnl_file_unreadable", watcher=self.name, path=str(self.cfg.path),
            error=why, grace_seconds=self.cfg.unreadable_grace_seconds,
        )  # fmt: skip

    def _judge(self, reading: PnlReading, mtime: float) -> None:
        cfg = self.cfg
        now = self._wall_clock()
        if self._unreadable is not None:
            log.info("pnl_file_recovered", watcher=self.name, was="unreadable")
            self._unreadable = None
            self._tripped.discard("unreadable")
        # A time in the future (clock skew, milliseconds) counts as "now": it
        # must not keep a value fresh forever.
        stamp = mtime if reading.timestamp is None else reading.timestamp
        self._fresh_at = min(stamp, now)
        self._has_value = True
        pnl = reading.pnl
        stale_after = cfg.stale_after_seconds
        peak = self._peaks.get(self.name)
        if (stale_after <= 0 or now - self._fresh_at <= stale_after) and (
            peak is None or pnl > peak
        ):
            self._peaks[self.name] = peak = pnl
            self._request_save()
        self._metrics.pnl.labels(watcher=self.name).set(pnl)
        self._metrics.pnl_headroom.labels(watcher=self.name).set(
            self._headroom(pnl, peak)
        )
        breach = self._breach(pnl, peak)
        if breach is None:
            self._breaches = 0
            self._tripped.discard("breach")
            return
        self._breaches += 1
        if "breach" in self._tripped:
            return
        confirmed = self._breaches >= cfg.breach_confirmations
        log.error(
            "pnl_limit_breached", watcher=self.name, pnl=pnl, peak=peak, limit=breach,
            breaches=self._breaches, breach_confirmations=cfg.breach_confirmations,
            tripping=confirmed,
        )  # fmt: skip
        if confirmed:
            self._trip("breach", breach)

    def _breach(self, pnl: float, peak: float | None) -> str | None:
        cfg = self.cfg
        if pnl <= -cfg.max_loss:
            return f"loss limit: pnl {pnl} <= -max_loss {cfg.max_loss}"
        drawdown = cfg.max_drawdown
        if drawdown is not None and peak is not None and pnl <= peak - drawdown:
            return f"drawdown limit: pnl {pnl} <= peak {peak} - max_drawdown {drawdown}"
        return None

    def _headroom(self, pnl: float, peak: float | None) -> float:
        room = pnl + self.cfg.max_loss
        if self.cfg.max_drawdown is not None and peak is not None:
            room = min(room, pnl - (peak - self.cfg.max_drawdown))
        return max(room, 0.0)

    def _check_clock_rules(self) -> None:
        cfg = self.cfg
        if self._unreadable is not None and "unreadable" not in self._tripped:
            since, why = self._unreadable
            elapsed = self._clock() - since
            if elapsed >= cfg.unreadable_grace_seconds:
                log.error(
                    "pnl_file_unreadable", watcher=self.name, path=str(cfg.path),
                    error=why, unreadable_seconds=round(elapsed, 3), tripping=True,
                )  # fmt: skip
                self._trip("unreadable", f"file unreadable for {elapsed:.1f}s: {why}")
        age = self._wall_clock() - self._fresh_at
        if self._has_value:
            self._metrics.pnl_age.labels(watcher=self.name).set(age)
        if cfg.stale_after_seconds <= 0:
            return
        if age <= cfg.stale_after_seconds:
            if "stale" in self._tripped:
                log.info("pnl_file_recovered", watcher=self.name, was="stale")
                self._tripped.discard("stale")
        elif "stale" not in self._tripped:
            log.error(
                "pnl_file_stale", watcher=self.name, path=str(cfg.path),
                age_seconds=round(age, 3), stale_after_seconds=cfg.stale_after_seconds,
            )  # fmt: skip
            self._trip(
                "stale",
                f"file stale: no fresh value for {age:.1f}s"
                f" (stale_after_seconds {cfg.stale_after_seconds})",
            )

    def _trip(self, condition: Condition, reason: str) -> None:
        # Once per episode: the condition must clear (or a reset happen) before
        # this watcher trips again; the Switch's resweep covers the meantime.
        self._tripped.add(condition)
        self._switch.trip(
            TripRequest(
                source="pnl",
                reason=f"pnl watcher {self.name}: {reason}",
                accounts=self.cfg.accounts or None,
                actor=f"pnl:{self.name}",
            )
        )


class _ReloadRequestedError(Exception):
    """Unwinds the watchers' TaskGroup so that they start again with new configs."""


class PnlWatchers:
    """Runs one watcher per configured PnL file; restarts them all on reload."""

    name = "pnl"

    def __init__(
        self,
        configs: Callable[[], tuple[PnlWatcherConfig, ...]],
        switch: TripSink,
        metrics: Metrics,
        peaks: dict[str, float],
        request_save: Callable[[], object],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._configs = configs
        self._switch = switch
        self._metrics = metrics
        self._peaks = peaks
        self._request_save = request_save
        self._clock = clock
        self._wall_clock = wall_clock
        self._reload_requested = asyncio.Event()
        self.watchers: dict[str, PnlWatcher] = {}

    def reload(self) -> None:
        """Apply the current configs (called after a successful SIGHUP reload)."""
        self._reload_requested.set()

    def on_reset(self, accounts: Iterable[str]) -> None:
        """Clear the drawdown peak of every watcher whose accounts were reset."""
        reset = set(accounts)
        cleared = []
        for cfg in self._configs():
            if reset.isdisjoint(cfg.accounts or self._switch.accounts):
                continue
            watcher = self.watchers.get(cfg.name)
            if watcher is not None:
                watcher.reset()
            self._peaks.pop(cfg.name, None)
            cleared.append(cfg.name)
        if cleared:
            log.info("pnl_peaks_cleared", watchers=cleared)
            self._request_save()

    async def run(self) -> None:
        """Watch until cancelled; a reload restarts every watcher (peaks are kept)."""
        while True:
            self._reload_requested.clear()
            self.watchers = {cfg.name: self._watcher(cfg) for cfg in self._configs()}
            log.info("pnl_watchers_started", watchers=list(self.watchers))
            try:
                async with asyncio.TaskGroup() as tg:
                    for name, watcher in self.watchers.items():
                        tg.create_task(watcher.run(), name=f"trigger.pnl.{name}")
                    tg.create_task(self._raise_on_reload(), name="trigger.pnl:reload")
            except* _ReloadRequestedError:
                pass  # start again with the configs of now

    def _watcher(self, cfg: PnlWatcherConfig) -> PnlWatcher:
        return PnlWatcher(
            cfg, self._switch, self._metrics, self._peaks, self._request_save,
            clock=self._clock, wall_clock=self._wall_clock,
        )  # fmt: skip

    async def _raise_on_reload(self) -> None:
        await self._reload_requested.wait()
        raise _ReloadRequestedError
