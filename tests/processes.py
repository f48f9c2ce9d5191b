"""Start and stop the real `killswitch run` process for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

POLL_SECONDS = 0.02


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the daemon needs a fixed one in its config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(
    path: Path, base_url: str, accounts: tuple[str, ...], **overrides: Any
) -> dict[str, Any]:
    """A YAML config for the real daemon; `overrides` replace top-level sections."""
    doc: dict[str, Any] = {
        "ems": {
            "default": {
                "base_url": base_url,
                "api_key_env": "TEST_COINAPI_KEY",
                "timeout_seconds": 1.0,
            }
        },
        "accounts": list(accounts),
        "retry": {
            "max_attempts": 6,
            "backoff_initial_seconds": 0.01,
            "backoff_max_seconds": 0.05,
            "max_attempts_other": 2,
        },
        "sweep": {
            "deadline_seconds": 5.0,
            "verify": True,
            "verify_attempts": 3,
            "resweep_interval_seconds": 0,
        },
        "api": {
            "listen": f"127.0.0.1:{free_port()}",
            "max_body_bytes": 65536,
            "tokens": [
                {
                    "name": "risk",
                    "token_env": "TEST_TRIP_TOKEN",
                    "permissions": ["trip"],
                },
                {
                    "name": "oncall",
                    "token_env": "TEST_ONCALL_TOKEN",
                    "permissions": ["trip", "reset", "status"],
                },
            ],
        },
        "triggers": {
            "signal": True,
            "alertmanager": {"match": {"severity": "critical"}},
            "grafana": {"match": {}},
        },
        "state_dir": str(path.parent / "state"),
        "halt_file": str(path.parent / "halted"),
        "log": {"format": "json", "level": "info"},
    }
    doc.update(overrides)
    path.write_text(yaml.safe_dump(doc))
    return doc


SECRETS = {
    "TEST_COINAPI_KEY": "sim-key-0123456789abcdef",
    "TEST_TRIP_TOKEN": "e2e-trip-token-5f1c",
    "TEST_ONCALL_TOKEN": "e2e-oncall-token-9b7d",
}


class DaemonProcess:
    """The real daemon, started with `python -m killswitch run -c FILE`."""

    def __init__(self, config_path: Path, *, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        doc = yaml.safe_load(config_path.read_text())
        self.api = "http://" + doc["api"]["listen"]
        self.log_path = config_path.with_suffix(f".{time.monotonic_ns()}.log")
        self._env = {**os.environ, **SECRETS, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        """Start the process (output to a log file we read back)."""
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "killswitch",
                    "run",
                    "-c",
                    str(self.config_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": "<non-json>", "line": line})
        return lines

    def output(self) -> str:
        return self.log_path.read_text()

    async def wait_for(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout_seconds: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Poll the log (bounded) until `predicate(events)` holds."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            events = self.events()
            if predicate(events):
                return events
            if self.proc is not None and self.proc.poll() is not None:
                msg = f"daemon exited {self.proc.returncode}:\n{self.output()[-3000:]}"
                raise AssertionError(msg)
            await asyncio.sleep(POLL_SECONDS)
        tail = self.output()[-3000:]
        msg = f"condition not met within {timeout_seconds}s; log:\n{tail}"
        raise AssertionError(msg)

    async def wait_for_event(
        self, event: str, count: int = 1, timeout_seconds: float = 10.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait for `count` log lines with this event (and fields); return them."""

        def matching(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                e
                for e in events
                if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())
            ]

        await self.wait_for(lambda evs: len(matching(evs)) >= count, timeout_seconds)
        return matching(self.events())

    async def wait_ready(self, timeout_seconds: float = 10.0) -> None:
        """Wait until the daemon says it is ready (API listening, triggers armed)."""
        await self.wait_for_event("daemon_ready", timeout_seconds=timeout_seconds)

    def send(self, signum: signal.Signals) -> None:
        os.kill(self.pid, signum)

    async def wait_exit(self, timeout_seconds: float = 20.0) -> int:
        """Poll (bounded, without blocking the loop an in-process simulator runs on)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_seconds
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                msg = f"daemon still running after {timeout_seconds}s"
                raise AssertionError(msg)
            await asyncio.sleep(POLL_SECONDS)
        return code

    def stop(self) -> None:
        """End the process we started (by its pid), whatever state it is in."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                self.api + path,
                headers=headers,
                json=json_body,
                data=data,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp,
        ):
            body = await resp.read()
            try:
                return resp.status, json.loads(body)
            except ValueError:
                return resp.status, body.decode(errors="replace")
