"""The Trigger protocol and TripRequest: what every trigger hands to the Switch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

Source = Literal[
    "signal", "webhook", "alertmanager", "grafana", "pnl", "startup", "resweep", "cli"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TripRequest:
    """A request to trip; `accounts` None means every account (fail safe)."""

    source: Source
    reason: str
    accounts: tuple[str, ...] | None = None
    actor: str | None = None  # token name, signal, watcher: who asked
    notes: tuple[str, ...] = ()  # why the request was widened, for the reply and audit
    # When the trigger was seen; the trigger-to-wire clock starts here.
    seen_monotonic: float = field(default_factory=time.monotonic)


class Trigger(Protocol):
    """A long-running task that calls Switch.trip when its condition holds."""

    name: str

    async def run(self) -> None:
        """Watch until cancelled."""
