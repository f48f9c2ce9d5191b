"""sd_notify over NOTIFY_SOCKET: READY, WATCHDOG, STATUS, STOPPING, RELOADING."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger()

# How often STATUS= is re-read when no watchdog asks for more frequent wake-ups.
STATUS_REFRESH_SECONDS = 1.0


class Notifier:
    """Sends systemd notifications; does nothing when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name"; the kernel wants a leading NUL.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        self.watchdog_interval_seconds = self._watchdog_interval(env)
        self._last_status: str | None = None
        self._failing: str | None = None  # the last send error, until a send works

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of WATCHDOG_USEC (sd_watchdog_enabled(3)); None: not ours to ping."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            interval = int(usec) / 1_000_000 / 2
        except ValueError:
            log.warning("sd_watchdog_usec_invalid", value=usec)
            return None
        return interval if interval > 0 else None

    @property
    def is_enabled(self) -> bool:
        """True when NOTIFY_SOCKET was given."""
        return self._socket is not None

    def notify(self, message: str) -> None:
        """Send one datagram; a failure is logged, not raised (systemd may be gone)."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            # Pings go out several times a second: say it once, not every time.
            if str(exc) != self._failing:
                self._failing = str(exc)
                log.warning("sd_notify_failed", error=str(exc))
        else:
            if self._failing is not None:
                self._failing = None
                log.info("sd_notify_recovered")

    def ready(self, status: str) -> None:
        """READY=1 with the state in words."""
        self._last_status = status
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, words: str) -> None:
        """STATUS= with the state in words, sent only when it changed."""
        if words != self._last_status:
            self._last_status = words
            self.notify(f"STATUS={words}")

    def reloading(self) -> None:
        """RELOADING=1 with the MONOTONIC_USEC systemd 253+ wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1: from here systemd's stop timeout applies, not the watchdog."""
        self._last_status = "stopping"
        self.notify("STOPPING=1\nSTATUS=stopping")

    async def run(self, status: Callable[[], str]) -> None:
        """Ping WATCHDOG=1 and refresh STATUS= from the event loop, until cancelled.

        The pings come from this coroutine, not a thread, so a blocked event loop
        stops them and systemd restarts the daemon.
        """
        if self._socket is None:
            return
        interval = self.watchdog_interval_seconds
        tick = (
            STATUS_REFRESH_SECONDS
            if interval is None
            else min(interval, STATUS_REFRESH_SECONDS)
        )
        while True:
            if interval is not None:
                # Every tick, not "when due": a timer that fires a hair early must
                # never skip a ping and leave a whole watchdog period uncovered.
                self.notify("WATCHDOG=1")
            self.status(status())
            await asyncio.sleep(tick)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
