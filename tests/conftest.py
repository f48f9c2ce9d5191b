"""Shared fixtures: the EMS simulator on loopback, configs, and test hygiene."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client import CollectorRegistry

from killswitch.config import (
    AccountConfig,
    ApiConfig,
    Config,
    EmsConfig,
    RetryConfig,
    SweepConfig,
    TokenConfig,
)
from killswitch.ems import EmsClient, create_session
from killswitch.fanout import Fanout
from killswitch.metrics import Metrics
from killswitch.sim import Simulator, running_simulator
from tests.processes import DaemonProcess, write_config

ACCOUNTS = ("BINANCE", "KRAKEN/JOHN", "COINBASE", "BITSTAMP/2574")
API_KEY = "sim-key-0123456789abcdef"  # a fake; tests scan output for it


def _patch_aioresponses() -> None:
    """aioresponses 0.7.9 builds ClientResponse without aiohttp 3.14's `stream_writer`.

    Shim until pnuckowski/aioresponses#289 is released; delete it then.
    """
    import aioresponses.core as core

    original: Any = getattr(core, "ClientResponse")  # noqa: B009 - not re-exported
    if getattr(original, "_killswitch_shim", False):
        return

    class _ShimResponse(original):  # type: ignore[misc]
        _killswitch_shim = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", None)
            super().__init__(*args, **kwargs)

    setattr(core, "ClientResponse", _ShimResponse)  # noqa: B010 - not re-exported


_patch_aioresponses()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@dataclass
class RunningSim:
    """A simulator served on 127.0.0.1 and its base URL."""

    sim: Simulator
    base_url: str


@pytest.fixture
async def ems_sim() -> AsyncIterator[RunningSim]:
    """The real simulator app on an ephemeral loopback port, with an API key."""
    sim = Simulator(ACCOUNTS, api_key=API_KEY, orders_per_account=3)
    async with running_simulator(sim) as base_url:
        yield RunningSim(sim, base_url)


def make_config(
    base_url: str,
    tmp_path: Path,
    *,
    accounts: tuple[str, ...] = ACCOUNTS,
    api_key: str | None = API_KEY,
    timeout_seconds: float = 1.0,
    retry: RetryConfig | None = None,
    sweep: SweepConfig | None = None,
    **overrides: Any,
) -> Config:
    """A Config for in-process tests: zero backoff so retries never sleep for real."""
    fields: dict[str, Any] = {
        "ems": {
            "default": EmsConfig(
                name="default",
                base_url=base_url,
                api_key=api_key,
                timeout_seconds=timeout_seconds,
            )
        },
        "accounts": tuple(AccountConfig(exchange_id=a) for a in accounts),
        "retry": retry
        or RetryConfig(
            max_attempts=6,
            backoff_initial_seconds=0.001,
            backoff_max_seconds=0.001,
            max_attempts_other=2,
        ),
        "sweep": sweep
        or SweepConfig(
            deadline_seconds=5.0,
            verify=True,
            verify_attempts=3,
            resweep_interval_seconds=0,
        ),
        "api": ApiConfig(
            host="127.0.0.1",
            port=0,
            tokens=(
                TokenConfig(
                    name="risk", token="trip-token-abc", permissions=frozenset({"trip"})
                ),
                TokenConfig(
                    name="oncall",
                    token="oncall-token-xyz",
                    permissions=frozenset({"trip", "reset", "status"}),
                ),
                TokenConfig(
                    name="viewer",
                    token="status-token-123",
                    permissions=frozenset({"status"}),
                ),
            ),
        ),
        "state_dir": tmp_path / "state",
        "halt_file": tmp_path / "halted",
    }
    fields.update(overrides)
    return Config(**fields)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh metrics registry per test."""
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    """Metrics on the test's own registry."""
    return Metrics(registry)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The daemon's kind of client session: pooled, traced."""
    async with create_session(len(ACCOUNTS), 5.0) as s:
        yield s


@pytest.fixture
def config(ems_sim: RunningSim, tmp_path: Path) -> Config:
    """A config pointing at the simulator."""
    return make_config(ems_sim.base_url, tmp_path)


@pytest.fixture
def client(session: aiohttp.ClientSession, config: Config) -> EmsClient:
    """An EmsClient on the simulator."""
    return EmsClient(session, config.ems, config.accounts)


@pytest.fixture
async def fanout(
    client: EmsClient, config: Config, metrics: Metrics
) -> AsyncIterator[Fanout]:
    """A Fanout on the simulator, drained at the end of the test."""
    async with Fanout(client, config.retry, config.sweep, metrics) as f:
        yield f


StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
async def start_daemon(
    ems_sim: RunningSim, tmp_path: Path
) -> AsyncIterator[StartDaemon]:
    """Start real daemons on the simulator; every one is stopped at teardown.

    Keyword arguments replace top-level config sections (see `write_config`).
    """
    started: list[DaemonProcess] = []
    config_path = tmp_path / "killswitch.yaml"

    def start(**overrides: Any) -> DaemonProcess:
        if not config_path.exists() or overrides:
            write_config(config_path, ems_sim.base_url, ACCOUNTS, **overrides)
        daemon = DaemonProcess(config_path).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> DaemonProcess:
    """One real daemon on the simulator, ready; stopped at teardown."""
    process = start_daemon()
    await process.wait_ready()
    return process
