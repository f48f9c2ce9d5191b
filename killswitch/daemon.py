"""Daemon.run(): owns lifetimes, SIGTERM/SIGINT/SIGHUP and the shutdown order.

Lifetimes nest so that whatever must outlive something else is outside it:
audit log -> persister -> HTTP client session -> fanout -> switch -> HTTP
server -> trigger TaskGroup. On SIGTERM the triggers stop first, the server
closes, fanout drains in-flight sweeps (bounded by the sweep deadline), then
the final state is written and the audit log flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from killswitch import __version__
from killswitch.audit import AUDIT_FILE_NAME, AuditLog
from killswitch.config import Config, load_config
from killswitch.ems import EmsClient, create_session, line_specs
from killswitch.errors import ConfigError, StateError
from killswitch.fanout import Fanout
from killswitch.http import Readiness, create_app
from killswitch.latch import Latch
from killswitch.line import CancelLines
from killswitch.metrics import Metrics
from killswitch.notify import Notifier
from killswitch.state import PersistedState, Persister, load_state
from killswitch.switch import Switch
from killswitch.triggers import Trigger, TripRequest
from killswitch.triggers.pnl_file import PnlWatchers
from killswitch.triggers.signals import SignalTrigger
from killswitch.warm import KeepWarm

log = structlog.get_logger()

STATUS_REFRESH_SECONDS = 1.0


class _StopRequested(Exception):  # noqa: N818 - a signal, not an error (STYLE 6)
    """Unwinds the trigger TaskGroup; never leaves Daemon.run()."""


@contextlib.contextmanager
def _handling_signals(
    callbacks: dict[signal.Signals, Callable[[], None]],
) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for signum, callback in callbacks.items():
        loop.add_signal_handler(signum, callback)
    try:
        yield
    finally:
        for signum in callbacks:
            loop.remove_signal_handler(signum)


# File descriptors kept free for what must never fail for want of one: the EMS
# lines and pool, the state, halt and audit files. Per account and fixed.
FDS_RESERVED_PER_ACCOUNT = 3
FDS_RESERVED = 64
API_KEEPALIVE_SECONDS = 15.0


def _cap_idle_connections(server: web.Server, reserved: int) -> None:
    """Keep API connections below the fd limit by closing the oldest idle ones.

    Idle or silent connections (slowloris) must never use up the descriptors a
    trip request, an EMS line or a state write needs. aiohttp has no cap of its
    own, so the server's connection hook is wrapped.
    """
    track = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        track(handler, transport)
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = max(soft_limit - reserved, 16)
        excess = len(server.connections) - cap
        # Oldest first (insertion order); never one with a request in progress.
        for old in server.connections:
            if excess <= 0:
                break
            if old is not handler and not getattr(old, "_request_in_progress", True):
                old.force_close()
                excess -= 1

    server.connection_made = connection_made  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def _serving(
    app: web.Application, host: str, port: int, accounts: int
) -> AsyncIterator[None]:
    # No access log: a flood of requests must not turn into a flood of writes.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=API_KEEPALIVE_SECONDS,
    )
    await runner.setup()
    assert runner.server is not None
    _cap_idle_connections(
        runner.server, FDS_RESERVED + FDS_RESERVED_PER_ACCOUNT * accounts
    )
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        log.info("api_listening", host=host, port=port)
        yield
    finally:
        await runner.cleanup()


def accounts_by_ems(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Account ids grouped by the EMS they go through."""
    groups: dict[str, list[str]] = {}
    for account in cfg.accounts:
        groups.setdefault(account.ems, []).append(account.exchange_id)
    return {ems: tuple(ids) for ems, ids in groups.items()}


class Daemon:
    """The long-running kill switch."""

    def __init__(
        self,
        config_path: Path,
        cfg: Config,
        *,
        registry: CollectorRegistry | None = None,
        extra_triggers: Callable[[Daemon], list[Trigger]] | None = None,
    ) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.metrics = Metrics(registry or CollectorRegistry())
        self.metrics.declare_accounts(cfg.account_ids)
        self.latch = Latch(cfg.account_ids)
        self.pnl_peaks: dict[str, float] = {}
        self.readiness = Readiness()
        self.notifier = Notifier()
        self._extra_triggers = extra_triggers
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self.switch: Switch | None = None
        self.pnl: PnlWatchers | None = None
        self.fanout: Fanout | None = None
        self.persister: Persister | None = None
        self.audit: AuditLog | None = None
        self._session: aiohttp.ClientSession | None = None
        self.lines: CancelLines | None = None

    def request_stop(self) -> None:
        """What SIGTERM/SIGINT do: ask for an orderly shutdown."""
        self._stop.set()

    def _snapshot(self) -> PersistedState:
        tripped = {}
        for account in self.latch.tripped_accounts:
            record = self.latch.record(account)
            assert record is not None
            tripped[account] = record
        return PersistedState(tripped=tripped, pnl_peaks=dict(self.pnl_peaks))

    def _on_write_error(self, what: str, exc: Exception) -> None:
        self.metrics.state_write_errors.labels(file=what).inc()
        log.error("state_write_failed", file=what, error=str(exc))
        if what != "audit" and self.audit is not None:
            self.audit.append("state_write_failed", file=what, error=str(exc))

    def _restore_state(self) -> TripRequest | None:
        """Latch what the state file says; the start-up trip to run, if any."""
        state_dir = self.cfg.state_dir
        try:
            persisted = load_state(state_dir)
        except StateError as exc:
            log.critical(
                "state_unreadable",
                error=str(exc),
                action="assuming every account tripped; sweeping all; reset to re-arm",
            )
            return TripRequest(
                source="startup",
                reason=f"state unreadable, assuming tripped: {exc}",
                notes=("state file unreadable: tripping all accounts",),
            )
        if persisted is None:
            return None
        self.pnl_peaks.update(persisted.pnl_peaks)
        known = {
            a: r for a, r in persisted.tripped.items() if a in self.cfg.account_ids
        }
        for account in set(persisted.tripped) - set(known):
            log.warning(
                "state_account_unknown",
                account=account,
                detail="tripped in the state file but not configured",
            )
        if not known:
            return None
        self.latch.restore(known)
        for account in known:
            self.metrics.tripped.labels(account=account).set(1)
        log.warning("state_restored_tripped", accounts=sorted(known))
        return TripRequest(
            source="startup",
            reason="restart with latched accounts",
            accounts=tuple(known),
        )

    def _ems_client(self) -> EmsClient:
        assert self._session is not None
        return EmsClient(self._session, self.cfg.ems, self.cfg.accounts, self.lines)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        cfg = self.cfg
        for warning in cfg.warnings:
            log.warning("config_warning", detail=warning)
        startup_trip = self._restore_state()
        timeout_seconds = max(e.timeout_seconds for e in cfg.ems.values())
        with _handling_signals(
            {
                signal.SIGTERM: self.request_stop,
                signal.SIGINT: self.request_stop,
                signal.SIGHUP: self._reload_requested.set,
            }
        ):
            async with (
                AuditLog(
                    cfg.state_dir / AUDIT_FILE_NAME, self._on_write_error
                ) as audit,
                Persister(
                    cfg.state_dir, cfg.halt_file, self._snapshot, self._on_write_error
                ) as persister,
                create_session(len(cfg.accounts), timeout_seconds) as session,
                CancelLines(line_specs(cfg.ems, cfg.accounts)) as lines,
            ):
                self.audit, self.persister, self._session = audit, persister, session
                self.lines = lines
                audit.append(
                    "started", version=__version__, config=str(self.config_path)
                )
                fanout = Fanout(self._ems_client(), cfg.retry, cfg.sweep, self.metrics)
                async with fanout:
                    switch = Switch(
                        self.latch,
                        fanout,
                        self.metrics,
                        audit,
                        persister,
                        cfg.account_ids,
                        halt_file=str(cfg.halt_file) if cfg.halt_file else None,
                    )
                    self.fanout, self.switch = fanout, switch
                    async with switch:
                        if startup_trip is not None:
                            switch.trip(startup_trip)
                        persister.request_save()  # the halt file matches the latch
                        await self._serve(switch)
                log.info("fanout_drained")
            self.notifier.close()
        log.info("stopped")
        return 0

    async def _serve(self, switch: Switch) -> None:
        app = create_app(switch, self.metrics, lambda: self.cfg, self.readiness)
        signal_trigger = SignalTrigger(switch) if self.cfg.triggers.signal else None
        assert self.persister is not None
        self.pnl = PnlWatchers(
            lambda: self.cfg.triggers.pnl,
            switch,
            self.metrics,
            self.pnl_peaks,
            self.persister.request_save,
        )
        switch.on_reset.append(self.pnl.on_reset)
        triggers: list[Trigger] = [self.pnl]
        if self._extra_triggers is not None:
            triggers.extend(self._extra_triggers(self))
        keep_warm = KeepWarm(
            self._ems_client,
            lambda: accounts_by_ems(self.cfg),
            self.metrics,
            self.readiness.ems_warm.__setitem__,
            is_busy=lambda: bool(switch.fanout.in_flight),
        )
        async with _serving(
            app, self.cfg.api.host, self.cfg.api.port, len(self.cfg.accounts)
        ):
            self.readiness.listening = True
            try:
                async with asyncio.TaskGroup() as tg:
                    if signal_trigger is not None:
                        signal_trigger.arm()
                        tg.create_task(signal_trigger.run(), name="trigger.signal")
                    for trigger in triggers:
                        tg.create_task(trigger.run(), name=f"trigger.{trigger.name}")
                    tg.create_task(keep_warm.run(), name="ems.keep_warm")
                    tg.create_task(self._resweep(switch), name="switch.resweep")
                    tg.create_task(self._reloads(), name="daemon.reload")
                    tg.create_task(self._systemd(switch), name="daemon.systemd")
                    tg.create_task(self._raise_when_stopped(), name="daemon.stop")
                    log.info(
                        "daemon_ready",
                        version=__version__,
                        accounts=len(self.cfg.accounts),
                    )
                    self.notifier.ready(self._status_words(switch))
            except* _StopRequested:
                log.info("shutdown_requested", sweeping=list(switch.fanout.in_flight))
                self.notifier.stopping()
            finally:
                self.readiness.listening = False

    async def _raise_when_stopped(self) -> None:
        await self._stop.wait()
        raise _StopRequested

    async def _resweep(self, switch: Switch) -> None:
        """While tripped, sweep the tripped accounts again every interval."""
        while True:
            interval = self.cfg.sweep.resweep_interval_seconds
            await asyncio.sleep(interval if interval > 0 else STATUS_REFRESH_SECONDS)
            if interval <= 0:
                continue
            due = tuple(
                a
                for a in self.latch.tripped_accounts
                if a in self.cfg.account_ids and not switch.fanout.is_sweeping(a)
            )
            if due:
                switch.trip(
                    TripRequest(source="resweep", reason="still tripped", accounts=due)
                )

    async def _reloads(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self.notifier.reloading()
            await self.reload()
            self.notifier.notify("READY=1")

    async def reload(self) -> bool:
        """SIGHUP: validate the file completely, then swap the config in one step."""
        assert self.audit is not None
        assert self.fanout is not None
        assert self.switch is not None
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error("reload_failed", problems=list(exc.problems), kept="old config")
            self.audit.append("reload_failed", problems=list(exc.problems))
            return False
        if (new.api.host, new.api.port) != (self.cfg.api.host, self.cfg.api.port):
            log.warning(
                "reload_listen_unchanged", detail="api.listen applies on restart"
            )
        if new.state_dir != self.cfg.state_dir or new.halt_file != self.cfg.halt_file:
            log.warning(
                "reload_paths_unchanged",
                detail="state_dir and halt_file apply on restart",
            )
        old_accounts = self.cfg.account_ids
        self.cfg = new
        self.latch.add_accounts(new.account_ids)  # latched accounts stay latched
        self.metrics.declare_accounts(
            tuple(a for a in new.account_ids if a not in old_accounts)
        )
        self.switch.accounts = new.account_ids
        if self.lines is not None:
            self.lines.configure(line_specs(new.ems, new.accounts))
        self.fanout.ems = self._ems_client()
        self.fanout.retry_cfg = new.retry
        self.fanout.sweep_cfg = new.sweep
        if self.pnl is not None:
            self.pnl.reload()
        for warning in new.warnings:
            log.warning("config_warning", detail=warning)
        log.info("config_reloaded", accounts=len(new.accounts))
        self.audit.append(
            "reload", config=str(self.config_path), accounts=len(new.accounts)
        )
        return True

    def _status_words(self, switch: Switch) -> str:
        """The state in words for `systemctl status`: tripped, sweeping, failing."""
        sweeping = switch.fanout.in_flight
        tripped = self.latch.tripped_accounts
        if sweeping:
            words = f"sweeping: {', '.join(sweeping)}"
        elif tripped:
            words = f"tripped: {', '.join(tripped)}"
        else:
            words = f"armed: {len(self.cfg.accounts)} accounts"
        errors = [
            e
            for e in (
                self.persister.last_error if self.persister else None,
                self.audit.last_error if self.audit else None,
            )
            if e
        ]
        if errors:
            words += f"; write failing: {'; '.join(errors)}"
        return words

    async def _systemd(self, switch: Switch) -> None:
        """WATCHDOG=1 from the event loop itself, and STATUS= when it changes."""
        await self.notifier.run(lambda: self._status_words(switch))
