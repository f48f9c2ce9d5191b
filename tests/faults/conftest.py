"""Helpers for the fault-injection suite: real daemons, polling, metrics, files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from killswitch.sim import RecordedRequest
from tests.processes import POLL_SECONDS, SECRETS, DaemonProcess, write_config

TRIP_TOKEN = SECRETS["TEST_TRIP_TOKEN"]
ONCALL_TOKEN = SECRETS["TEST_ONCALL_TOKEN"]
CANCEL = "/v1/orders/cancel/all"
ORDERS = "/v1/orders"


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout_seconds: float = 10.0
) -> None:
    """Poll `predicate` (bounded) until it holds; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"{what}: not within {timeout_seconds}s"
            raise AssertionError(msg)
        await asyncio.sleep(POLL_SECONDS)


async def wait_until_async(
    predicate: Callable[[], Awaitable[bool]],
    what: str,
    timeout_seconds: float = 10.0,
) -> None:
    """Like `wait_until`, for a predicate that has to await (an HTTP call)."""
    deadline = time.monotonic() + timeout_seconds
    while not await predicate():
        if time.monotonic() > deadline:
            msg = f"{what}: not within {timeout_seconds}s"
            raise AssertionError(msg)
        await asyncio.sleep(POLL_SECONDS)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    return None


async def get_metrics(daemon: DaemonProcess) -> str:
    """The daemon's /metrics text."""
    status, body = await daemon.request("GET", "/metrics")
    assert status == 200
    assert isinstance(body, str)
    return body


async def get_status(daemon: DaemonProcess) -> dict[str, Any]:
    """The daemon's /v1/status document."""
    status, body = await daemon.request("GET", "/v1/status", token=ONCALL_TOKEN)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def audit_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every record of the audit log (a torn last line is skipped)."""
    path = state_dir / "audit.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def persisted_trips(state_dir: Path) -> dict[str, str] | None:
    """Account -> trip id from state.json; None when there is no state file yet."""
    path = state_dir / "state.json"
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return {account: rec["trip_id"] for account, rec in doc["tripped"].items()}


def cancels(
    requests: Iterable[RecordedRequest],
    account: str | None = None,
    *,
    since: float = 0.0,
) -> list[RecordedRequest]:
    """The cancel-alls in a record (of one account, received after `since`)."""
    return [
        r
        for r in requests
        if r.path == CANCEL
        and r.received_monotonic >= since
        and (account is None or r.exchange_id == account)
    ]


def alive(daemon: DaemonProcess) -> bool:
    """True while the daemon process runs."""
    return daemon.proc is not None and daemon.proc.poll() is None


def kill9(daemon: DaemonProcess) -> None:
    """SIGKILL the daemon we started (by its pid) and reap it."""
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted`; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


class Daemons:
    """Writes configs and starts real daemons; teardown ends the ones still running."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[DaemonProcess] = []

    def write(
        self,
        base_url: str,
        accounts: tuple[str, ...],
        name: str = "killswitch.yaml",
        **overrides: Any,
    ) -> Path:
        """Write a config next to the test's state dir and return its path."""
        path = self.tmp_path / name
        write_config(path, base_url, accounts, **overrides)
        return path

    def start(
        self, config_path: Path, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        """Start `killswitch run -c config_path`."""
        daemon = DaemonProcess(config_path, env=env).start()
        self.started.append(daemon)
        return daemon

    async def stop(self, daemon: DaemonProcess, timeout_seconds: float = 15.0) -> int:
        """SIGTERM, then wait without blocking the loop an in-process EMS runs on."""
        if not alive(daemon):
            assert daemon.proc is not None
            return daemon.proc.returncode
        daemon.send(signal.SIGTERM)
        try:
            return await daemon.wait_exit(timeout_seconds)
        except AssertionError:
            kill9(daemon)
            raise

    async def aclose(self) -> None:
        for daemon in self.started:
            if alive(daemon):
                # stop() kills what does not exit in time, then raises: it is gone.
                with contextlib.suppress(AssertionError):
                    await self.stop(daemon, timeout_seconds=10.0)


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    """Real daemon processes; every one still running is stopped at teardown."""
    manager = Daemons(tmp_path)
    try:
        yield manager
    finally:
        await manager.aclose()


async def post(
    session: aiohttp.ClientSession,
    url: str,
    token: str | None,
    body: Any = None,
) -> tuple[int, Any]:
    """POST JSON with a bearer token; (status, parsed body or text)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(
        url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
    ) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")


def proc_fd_count(pid: int) -> int:
    """Open file descriptors of process `pid` (Linux /proc)."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
