"""Latch: per-account ARMED -> TRIPPED state machine; sync, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class TripRecord:
    """What tripped an account: enough to explain it after a restart."""

    trip_id: str
    source: str
    reason: str
    time: float  # unix seconds


class Latch:
    """Which accounts are tripped; only a reset arms an account again."""

    def __init__(self, accounts: Iterable[str]) -> None:
        self._tripped: dict[str, TripRecord | None] = dict.fromkeys(accounts)
        self.last_trip: TripRecord | None = None

    @property
    def accounts(self) -> tuple[str, ...]:
        """Every account the latch knows, configured or restored."""
        return tuple(self._tripped)

    @property
    def tripped_accounts(self) -> tuple[str, ...]:
        """Accounts tripped now, in a stable order."""
        return tuple(a for a, rec in self._tripped.items() if rec is not None)

    @property
    def is_any_tripped(self) -> bool:
        """True while at least one account is tripped."""
        return any(rec is not None for rec in self._tripped.values())

    def is_tripped(self, account: str) -> bool:
        """True while `account` is tripped."""
        return self._tripped.get(account) is not None

    def record(self, account: str) -> TripRecord | None:
        """The trip that latched `account`, or None while armed."""
        return self._tripped.get(account)

    def trip(self, accounts: Iterable[str], record: TripRecord) -> None:
        """Latch `accounts`; an account tripped already keeps its first record."""
        for account in accounts:
            if self._tripped.get(account) is None:
                self._tripped[account] = record
        self.last_trip = record

    def reset(self, accounts: Iterable[str]) -> tuple[str, ...]:
        """Arm `accounts` again; returns those that were tripped."""
        was_tripped = []
        for account in accounts:
            if self._tripped.get(account) is not None:
                was_tripped.append(account)
                self._tripped[account] = None
        return tuple(was_tripped)

    def add_accounts(self, accounts: Iterable[str]) -> None:
        """Know new accounts (after a reload); existing latches are untouched."""
        for account in accounts:
            self._tripped.setdefault(account, None)

    def restore(self, tripped: Mapping[str, TripRecord]) -> None:
        """Latch accounts recorded as tripped in the persisted state."""
        for account, record in tripped.items():
            self._tripped[account] = record
            if self.last_trip is None or record.time > self.last_trip.time:
                self.last_trip = record
