"""Switch: latch, coalesce, hand accounts to Fanout; what every trigger calls.

`trip()` is synchronous and does only in-memory work before the cancel-alls
are handed to Fanout, which writes each first cancel-all on its warm line right
there. Persistence is requested next (a worker thread writes it). The log line
and the audit record follow from a recorder task once every request is on the
wire (bounded wait), so stdout never sits between a trigger and the exchange.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

from killswitch import __version__
from killswitch.audit import AuditLog
from killswitch.fanout import Fanout, SweepResult, Trip, resolve_accounts
from killswitch.latch import Latch, TripRecord
from killswitch.metrics import Metrics
from killswitch.state import Persister
from killswitch.triggers import TripRequest

log = structlog.get_logger()

# How long the recorder holds back the log line and the audit record so that
# cancel-alls sent through the session (no warm line) go out first.
WIRE_WAIT_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class TripReceipt:
    """What a trigger learns: the trip id and the accounts it covers."""

    trip_id: str
    accounts: tuple[str, ...]
    notes: tuple[str, ...]
    coalesced: tuple[str, ...]  # already being swept: swept again right after
    save_generation: int  # Persister.wait_saved(...) tells when the trip is durable


@dataclass(frozen=True, slots=True)
class ResetReceipt:
    """Which accounts were re-armed, and which still finish a sweep in flight."""

    reset: tuple[str, ...]
    still_sweeping: tuple[str, ...]
    notes: tuple[str, ...]


class Switch:
    """The one place that trips and resets accounts."""

    def __init__(
        self,
        latch: Latch,
        fanout: Fanout,
        metrics: Metrics,
        audit: AuditLog,
        persister: Persister,
        accounts: tuple[str, ...],
        *,
        halt_file: str | None = None,
    ) -> None:
        self.latch = latch
        self.fanout = fanout
        self._metrics = metrics
        self._audit = audit
        self._persister = persister
        self.accounts = accounts
        self._halt_file = halt_file
        self._recorded: asyncio.Queue[tuple[Trip, asyncio.Event]] = asyncio.Queue()
        self._tg = asyncio.TaskGroup()
        self.on_reset: list[Callable[[tuple[str, ...]], None]] = []
        self.last_sweep: SweepResult | None = None
        fanout.add_done_callback(self._sweep_done)

    async def __aenter__(self) -> Switch:
        await self._tg.__aenter__()
        self._tg.create_task(self._record_trips(), name="switch.recorder")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._recorded.put_nowait(_STOP)
        await self._tg.__aexit__(exc_type, exc, tb)

    def trip(self, request: TripRequest) -> TripReceipt:
        """Latch and sweep the requested accounts (all, when in doubt); never blocks."""
        accounts, widened = resolve_accounts(request.accounts, self.accounts)
        coalesced = tuple(a for a in accounts if self.fanout.is_sweeping(a))
        trip = Trip(
            trip_id=uuid.uuid4().hex[:16],
            source=request.source,
            reason=request.reason,
            accounts=accounts,
            seen_monotonic=request.seen_monotonic,
            seen_time=time.time(),
            actor=request.actor,
            notes=request.notes + widened,
        )
        _, wired = self.fanout.submit(trip)  # first: the cancel-alls
        self.latch.trip(
            accounts,
            TripRecord(
                trip_id=trip.trip_id,
                source=trip.source,
                reason=trip.reason,
                time=trip.seen_time,
            ),
        )
        # Warm lines have written every first cancel-all by now: persist at once.
        generation = self._persister.request_save()
        for account in accounts:
            self._metrics.tripped.labels(account=account).set(1)
        self._metrics.trips.labels(source=trip.source).inc()
        self._metrics.last_trip_timestamp.set(trip.seen_time)
        self._recorded.put_nowait((trip, wired))
        return TripReceipt(trip.trip_id, accounts, trip.notes, coalesced, generation)

    async def wait_persisted(
        self, receipt: TripReceipt, timeout_seconds: float
    ) -> bool:
        """True once the trip is on disk (so a restart re-sweeps it)."""
        return await self._persister.wait_saved(
            receipt.save_generation, timeout_seconds
        )

    def reset(
        self, accounts: Iterable[str] | None, reason: str, actor: str | None
    ) -> ResetReceipt:
        """Re-arm accounts (all when None); sweeps in flight still run to their end."""
        notes: list[str] = []
        if accounts is None:
            wanted = self.latch.accounts
        else:
            wanted = tuple(dict.fromkeys(accounts))
            unknown = [a for a in wanted if a not in self.latch.accounts]
            if unknown:
                notes.append(f"unknown accounts ignored: {unknown}")
                wanted = tuple(a for a in wanted if a not in unknown)
        was_tripped = self.latch.reset(wanted)
        for account in wanted:
            self._metrics.tripped.labels(account=account).set(0)
        still = tuple(a for a in wanted if self.fanout.is_sweeping(a))
        if still:
            notes.append(
                "a sweep in flight runs to its end; cancels are never abandoned"
            )
        for callback in self.on_reset:
            callback(wanted)
        self._persister.request_save()
        log.warning(
            "reset_done",
            accounts=list(wanted),
            was_tripped=list(was_tripped),
            still_sweeping=list(still),
            reason=reason,
            actor=actor,
        )
        self._audit.append(
            "reset",
            accounts=list(wanted),
            was_tripped=list(was_tripped),
            still_sweeping=list(still),
            reason=reason,
            actor=actor,
        )
        return ResetReceipt(wanted, still, tuple(notes))

    async def _record_trips(self) -> None:
        while True:
            item = await self._recorded.get()
            if item is _STOP:
                return
            trip, wired = item
            hold = trip.seen_monotonic + WIRE_WAIT_SECONDS - time.monotonic()
            if hold > 0 and not wired.is_set():
                try:
                    async with asyncio.timeout(hold):
                        await wired.wait()
                except TimeoutError:
                    pass
            fields = _trip_fields(trip)
            log.warning("trip_latched", **fields)
            self._audit.append("trip", **fields)

    def _sweep_done(self, result: SweepResult) -> None:
        self.last_sweep = result
        trip = result.trip
        for account, r in result.accounts.items():
            if not r.ok:
                log.error(
                    "account_not_flat",
                    trip_id=trip.trip_id,
                    account=account,
                    outcome=r.outcome,
                    attempts=r.attempts,
                    open_orders=r.open_orders,
                    flat=r.flat,
                    error=r.error,
                )
        summary = {
            "trip_id": trip.trip_id,
            "source": trip.source,
            "ok": len(result.ok),
            "failed": len(result.failed),
            "duration_seconds": round(result.duration_seconds, 4),
            "wire_ms": None
            if result.wire_seconds is None
            else round(result.wire_seconds * 1000, 3),
            # CLOCK_MONOTONIC is shared between processes: benchmarks line these
            # up with the moment they sent the trigger and the EMS received it.
            "seen_monotonic": trip.seen_monotonic,
            "wire_monotonic": result.wire_monotonic,
            "cancelled_monotonic": result.cancelled_monotonic,
        }
        log.info("fanout_finished", **summary)
        self._audit.append(
            "sweep_result",
            **summary,
            accounts={
                a: {
                    "outcome": r.outcome,
                    "attempts": r.attempts,
                    "open_orders": r.open_orders,
                    "flat": r.flat,
                    "error": r.error,
                }
                for a, r in result.accounts.items()
            },
        )

    def status(self) -> dict[str, Any]:
        """Everything /v1/status and `killswitch status` show."""
        last = self.latch.last_trip
        accounts: dict[str, Any] = {}
        for account in self.latch.accounts:
            record = self.latch.record(account)
            r = self.fanout.last_results.get(account)
            accounts[account] = {
                "tripped": record is not None,
                "trip_id": record.trip_id if record else None,
                "tripped_at": record.time if record else None,
                "in_flight": self.fanout.is_sweeping(account),
                "last_outcome": r.outcome if r else None,
                "attempts": r.attempts if r else 0,
                "open_orders": r.open_orders if r else None,
                "flat": r.flat if r else None,
                "error": r.error if r else None,
            }
        return {
            "version": __version__,
            "state": "tripped" if self.latch.is_any_tripped else "armed",
            "tripped_accounts": list(self.latch.tripped_accounts),
            "sweeping": list(self.fanout.in_flight),
            "accounts": accounts,
            "last_trip": None
            if last is None
            else {
                "trip_id": last.trip_id,
                "source": last.source,
                "reason": last.reason,
                "time": last.time,
            },
            "halt_file": self._halt_file,
            "persistence_error": self._persister.last_error,
            "audit_error": self._audit.last_error,
        }


def _trip_fields(trip: Trip) -> dict[str, Any]:
    return {
        "trip_id": trip.trip_id,
        "source": trip.source,
        "reason": trip.reason,
        "accounts": list(trip.accounts),
        "actor": trip.actor,
        "notes": list(trip.notes),
    }


_STOP: Any = object()
