"""sd_notify over NOTIFY_SOCKET: READY, WATCHDOG, STATUS, STOPPING, RELOADING."""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger()


class Notifier:
    """Sends systemd notifications; does nothing when not run by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name"; the kernel wants a leading NUL.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        self.watchdog_interval_seconds = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1_000_000 / 2  # ping at half the timeout
        except ValueError:
            return None

    @property
    def is_enabled(self) -> bool:
        """True when NOTIFY_SOCKET was given."""
        return self._socket is not None

    def notify(self, message: str) -> None:
        """Send one datagram; a failure is logged, never raised (systemd may be gone)."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))

    def reloading(self) -> None:
        """RELOADING=1 with the MONOTONIC_USEC systemd 253+ wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
