"""Manual trip on SIGUSR1 (never touches SIGTERM/SIGINT)."""

from __future__ import annotations

import asyncio
import signal
import time

import structlog

from killswitch.switch import Switch
from killswitch.triggers import TripRequest

log = structlog.get_logger()


class SignalTrigger:
    """SIGUSR1 trips every account (source `signal`)."""

    name = "signal"

    def __init__(self, switch: Switch) -> None:
        self._switch = switch
        self._armed = False

    def _on_signal(self) -> None:
        self._switch.trip(
            TripRequest(
                source="signal", reason="SIGUSR1 received", actor="signal",
                seen_monotonic=time.monotonic(),
            )
        )  # fmt: skip

    def arm(self) -> None:
        """Install the SIGUSR1 handler now, before the daemon reports ready."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._on_signal)
        self._armed = True

    async def run(self) -> None:
        """Keep SIGUSR1 handled until cancelled; remove the handler on the way out."""
        if not self._armed:
            self.arm()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.Event().wait()
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
