"""Fanout: cancel on every account concurrently, retry, verify; drains on exit.

Each account has at most one sweep in flight. A trip naming an account that
is being swept is folded into a follow-up sweep of that account, started the
moment the running one ends, so no account ever has two overlapping requests
and no account waits for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from structlog.contextvars import bound_contextvars
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from killswitch.config import RetryConfig, SweepConfig
from killswitch.ems import EmsClient, WireStamp
from killswitch.errors import EmsError, EmsRejectedError, EmsUnavailableError
from killswitch.line import Fired
from killswitch.metrics import Metrics
from killswitch.triggers import Source

log = structlog.get_logger()

# The least a finished account waits for the rest of its trip's first answers.
MIN_ANSWER_WAIT_SECONDS = 0.005
# Outcomes a re-cancel cannot change (bad request, bad key, a final reject).
FINAL_OUTCOMES = frozenset({"rejected", "auth_error"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Trip:
    """One accepted trip request, with the accounts it names resolved."""

    trip_id: str
    source: Source
    reason: str
    accounts: tuple[str, ...]
    seen_monotonic: float
    seen_time: float  # unix seconds
    actor: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(slots=True, kw_only=True)
class AccountResult:
    """How one account's sweep ended."""

    exchange_id: str
    outcome: str  # of the last cancel-all attempt
    attempts: int
    open_orders: int | None = None  # after verification; None = unknown
    flat: bool | None = None  # None when verification is off
    error: str | None = None
    duration_seconds: float = 0.0
    trip_id: str = ""
    cancelled_monotonic: float = 0.0  # when the cancel phase (before verify) ended

    @property
    def ok(self) -> bool:
        """Accepted, and verified flat when verification ran."""
        return self.outcome == "accepted" and self.flat is not False


@dataclass(slots=True, kw_only=True)
class SweepResult:
    """Every account of one trip, once all of them are done."""

    trip: Trip
    accounts: dict[str, AccountResult] = field(default_factory=dict)
    duration_seconds: float = 0.0
    wire_seconds: float | None = None  # trip seen -> last first attempt written
    wire_monotonic: float | None = None
    cancelled_monotonic: float | None = None  # last account's cancel-all answered

    @property
    def ok(self) -> tuple[str, ...]:
        """Accounts that ended accepted (and flat when verified)."""
        return tuple(a for a, r in self.accounts.items() if r.ok)

    @property
    def failed(self) -> tuple[str, ...]:
        """Accounts that did not."""
        return tuple(a for a, r in self.accounts.items() if not r.ok)


class _TripProgress:
    """Collects the accounts of one trip until all are done."""

    def __init__(self, trip: Trip, future: asyncio.Future[SweepResult]) -> None:
        self.trip = trip
        self.future = future
        self.remaining = set(trip.accounts)
        self.result = SweepResult(trip=trip)
        self.last_wire: float | None = None
        self.wired = asyncio.Event()
        self.unwired = set(trip.accounts)
        self.answered = asyncio.Event()  # every account's first cancel-all answered
        self.unanswered = set(trip.accounts)

    def mark_wired(self, account: str, at: float | None) -> None:
        if at is not None and (self.last_wire is None or at > self.last_wire):
            self.last_wire = at
        self.unwired.discard(account)
        if not self.unwired:
            self.wired.set()

    def mark_answered(self, account: str) -> None:
        self.unanswered.discard(account)
        if not self.unanswered:
            self.answered.set()


class Fanout:
    """Runs per-account sweeps in a TaskGroup; on exit waits for them (bounded)."""

    def __init__(
        self,
        ems: EmsClient,
        retry: RetryConfig,
        sweep: SweepConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.ems = ems
        self.retry_cfg = retry
        self.sweep_cfg = sweep
        self._metrics = metrics
        self._done_callbacks: list[Callable[[SweepResult], None]] = []
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._tg = asyncio.TaskGroup()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, list[_TripProgress]] = {}
        self.last_results: dict[str, AccountResult] = {}
        self._accepting = True
        self._request_counters: dict[tuple[str, str], Counter] = {}
        self._request_timers: dict[str, Histogram] = {}

    def add_done_callback(self, callback: Callable[[SweepResult], None]) -> None:
        """Call `callback` with every trip's result once all its accounts are done."""
        self._done_callbacks.append(callback)

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Accounts with a sweep running now."""
        return tuple(self._running)

    def is_sweeping(self, account: str) -> bool:
        """True while `account` has a sweep running."""
        return account in self._running

    async def __aenter__(self) -> Fanout:
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._accepting = False
        if self._running:
            log.info("fanout_draining", accounts=list(self._running))
        try:
            async with asyncio.timeout(self.sweep_cfg.deadline_seconds + 1.0):
                await self._tg.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            log.error("fanout_drain_timed_out", accounts=list(self._running))

    def submit(self, trip: Trip) -> tuple[asyncio.Future[SweepResult], asyncio.Event]:
        """Sweep `trip.accounts` now, or right after their running sweeps.

        Returns a future for the whole trip's result and an event set once every
        account's first cancel-all is on the wire (or has failed to get there).
        """
        future: asyncio.Future[SweepResult] = asyncio.get_running_loop().create_future()
        progress = _TripProgress(trip, future)
        if not trip.accounts:
            progress.wired.set()
            self._finish(progress)
            return future, progress.wired
        for account in trip.accounts:
            if account in self._running or not self._accepting:
                # Swept again right after the running sweep: never two at once.
                self._waiting.setdefault(account, []).append(progress)
                continue
            # Written here, synchronously, when the account's warm line is ready.
            fired = self.ems.fire(account)
            if fired is not None:
                progress.mark_wired(account, fired.written_monotonic)
            self._running[account] = self._tg.create_task(
                self._account_worker(account, fired, [progress]),
                name=f"fanout.{account}",
            )
        return future, progress.wired

    async def sweep(self, trip: Trip) -> SweepResult:
        """Submit `trip` and wait for every account of it."""
        future, _ = self.submit(trip)
        return await future

    async def _account_worker(
        self, account: str, fired: Fired | None, first: list[_TripProgress]
    ) -> None:
        """Sweep for `first`, then again for each batch of trips that came meanwhile.

        Trips that arrive after this run's cancel-all was written wait in
        `_waiting` for the next run, so each gets a cancel-all sent after it.
        """
        waiters: list[_TripProgress] | None = first
        try:
            while waiters:
                fired = fired or self.ems.fire(account)
                # Task-local: every log line of this run carries the trip id.
                with bound_contextvars(trip_id=waiters[-1].trip.trip_id):
                    result = await self._sweep_account(account, waiters, fired)
                fired = None
                self.last_results[account] = result
                for progress in waiters:
                    progress.result.accounts[account] = result
                    progress.remaining.discard(account)
                    if not progress.remaining:
                        self._finish(progress)
                waiters = self._waiting.pop(account, None)
        finally:
            del self._running[account]

    def _finish(self, progress: _TripProgress) -> None:
        result = progress.result
        trip = progress.trip
        result.duration_seconds = self._clock() - trip.seen_monotonic
        if result.accounts:
            result.cancelled_monotonic = max(
                r.cancelled_monotonic for r in result.accounts.values()
            )
        if progress.last_wire is not None:
            result.wire_monotonic = progress.last_wire
            result.wire_seconds = progress.last_wire - trip.seen_monotonic
            self._metrics.trigger_to_wire.labels(source=trip.source).observe(
                result.wire_seconds
            )
        self._metrics.sweep_duration.observe(result.duration_seconds)
        if not progress.future.done():
            progress.future.set_result(result)
        for callback in self._done_callbacks:
            callback(result)

    async def _sweep_account(
        self, account: str, waiters: list[_TripProgress], fired: Fired | None
    ) -> AccountResult:
        started = self._clock()
        deadline = started + self.sweep_cfg.deadline_seconds
        trip_id = waiters[-1].trip.trip_id
        stamp = WireStamp()
        first_log: list[dict[str, Any]] = []
        # The first attempt goes straight out: no retry machinery on the hot path.
        outcome, attempts, error = await self._cancel(
            account, deadline, stamp, waiters, fired=fired, first_log=first_log
        )
        answered = self._clock()
        if fired is not None and attempts == 1 and fired.answered_monotonic:
            answered = fired.answered_monotonic  # read off the socket, not resumed
        result = AccountResult(
            exchange_id=account,
            outcome=outcome,
            attempts=attempts,
            error=error,
            trip_id=trip_id,
            cancelled_monotonic=answered,
        )
        # Until every account of the trip has its first answer, the loop belongs
        # to reading those answers: log lines and verification wait. Answers of
        # one burst arrive together, so waiting as long again as this account's
        # own answer took covers them; a hung account delays no one for longer.
        await self._all_answered(waiters[0], answered - started, deadline)
        _flush_log(first_log)
        if self.sweep_cfg.verify:
            await self._verify(account, deadline, result)
        result.duration_seconds = self._clock() - started
        if result.open_orders is not None:
            self._metrics.open_orders.labels(account=account).set(result.open_orders)
        if result.flat is not None:
            self._metrics.account_flat.labels(account=account).set(int(result.flat))
        return result

    async def _all_answered(
        self, progress: _TripProgress, own_latency: float, deadline: float
    ) -> None:
        if progress.answered.is_set():
            return
        bound = min(max(own_latency, MIN_ANSWER_WAIT_SECONDS), deadline - self._clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(bound, 0.0)):
                await progress.answered.wait()

    async def _cancel(
        self,
        account: str,
        deadline: float,
        stamp: WireStamp | None,
        waiters: list[_TripProgress] | None = None,
        *,
        first_attempt: int = 1,
        fired: Fired | None = None,
        first_log: list[dict[str, Any]] | None = None,
    ) -> tuple[str, int, str | None]:
        """Cancel-all with retries; returns (last outcome, attempts, last error)."""
        try:
            await self._attempt(
                account, first_attempt, deadline, stamp, fired, defer_log=first_log
            )
        except EmsError as first_error:
            if waiters:
                self._first_attempt_done(account, stamp, waiters)
            _flush_log(first_log)  # retries follow: keep the lines in order
            return await self._retry_after(
                account, first_error, deadline, first_attempt
            )
        if waiters:
            self._first_attempt_done(account, stamp, waiters)
        return "accepted", 1, None

    @staticmethod
    def _first_attempt_done(
        account: str, stamp: WireStamp | None, waiters: list[_TripProgress]
    ) -> None:
        at = stamp.written_monotonic if stamp is not None else None
        for progress in waiters:
            progress.mark_wired(account, at)
            progress.mark_answered(account)

    async def _attempt(
        self,
        account: str,
        attempt: int,
        deadline: float,
        stamp: WireStamp | None,
        fired: Fired | None = None,
        *,
        defer_log: list[dict[str, Any]] | None = None,
    ) -> None:
        """One cancel-all; counted, timed and logged (or its log line deferred)."""
        started = fired.written_monotonic if fired is not None else self._clock()
        outcome = "error"  # a bug unwinds with this label; EMS answers are classified
        try:
            await self.ems.cancel_all(
                account, fired=fired, stamp=stamp, limit_seconds=deadline - started
            )
            outcome = "accepted"
        except EmsError as exc:
            outcome = exc.outcome
            raise
        finally:
            elapsed = self._clock() - started
            self._counted(account, outcome).inc()
            self._timed(account).observe(elapsed)
            fields = {
                "account": account,
                "attempt": attempt,
                "outcome": outcome,
                "latency_ms": round(elapsed * 1000, 3),
            }
            if defer_log is not None:
                defer_log.append(fields)
            else:
                log.info("cancel_all_attempted", **fields)

    def _counted(self, account: str, outcome: str) -> Counter:
        # labels() costs a lock and a dict look-up per call: cache the children.
        key = (account, outcome)
        child = self._request_counters.get(key)
        if child is None:
            child = self._metrics.cancel_requests.labels(
                account=account, outcome=outcome
            )
            self._request_counters[key] = child
        return child

    def _timed(self, account: str) -> Histogram:
        child = self._request_timers.get(account)
        if child is None:
            child = self._metrics.cancel_request_duration.labels(account=account)
            self._request_timers[account] = child
        return child

    def _is_retryable(self, exc: BaseException, attempt: int) -> bool:
        if isinstance(exc, EmsUnavailableError):
            return True
        return (
            isinstance(exc, EmsRejectedError)
            and exc.reject_reason == "OTHER"
            and attempt < self.retry_cfg.max_attempts_other
        )

    def _backoff_seconds(self, state: RetryCallState) -> float:
        # Full jitter (SPEC): uniform in [0, min(max, initial * 2**(n-1))].
        cap = min(
            self.retry_cfg.backoff_max_seconds,
            self.retry_cfg.backoff_initial_seconds * 2 ** (state.attempt_number - 1),
        )
        wait = self._rng.uniform(0.0, cap)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after_seconds", None)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    async def _retry_after(
        self, account: str, first_error: EmsError, deadline: float, first_attempt: int
    ) -> tuple[str, int, str | None]:
        """Retry with tenacity; the first attempt already happened outside it."""
        attempts = 1
        last: EmsError = first_error
        remaining = deadline - self._clock()
        if not self._is_retryable(first_error, 1) or self.retry_cfg.max_attempts < 2:
            return last.outcome, attempts, str(last)
        replayed_first = [first_error]

        async def attempt() -> None:
            nonlocal attempts, last
            if replayed_first:
                # Replay the first failure so tenacity applies wait and stop to it.
                raise replayed_first.pop()
            attempts += 1
            await self._attempt(account, first_attempt + attempts - 1, deadline, None)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = exc.outcome if isinstance(exc, EmsError) else "unknown"
            self._metrics.cancel_retries.labels(account=account, reason=reason).inc()

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: self._is_retryable(exc, attempts)),
            stop=stop_after_attempt(self.retry_cfg.max_attempts)
            | stop_before_delay(max(remaining, 0.0)),
            wait=self._backoff_seconds,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            await retrying(attempt)
        except EmsError as exc:
            last = exc
            return exc.outcome, attempts, str(exc)
        return "accepted", attempts, None

    async def _verify(
        self, account: str, deadline: float, result: AccountResult
    ) -> None:
        """List open orders; re-cancel while some remain, up to verify_attempts."""
        for check in range(1, self.sweep_cfg.verify_attempts + 1):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                orders = await self.ems.open_orders(account, limit_seconds=remaining)
            except EmsError as exc:
                result.open_orders = None
                result.error = str(exc)
                log.warning(
                    "verify_failed", account=account, check=check, error=str(exc)
                )
            else:
                result.open_orders = len(orders)
                if not orders:
                    result.flat = True
                    return
                log.warning(
                    "orders_survived_cancel",
                    account=account,
                    check=check,
                    open_orders=len(orders),
                )
                if check == self.sweep_cfg.verify_attempts:
                    break
                if result.outcome in FINAL_OUTCOMES:
                    break  # the EMS refuses cancel-all here: asking again cannot help
                outcome, attempts, error = await self._cancel(
                    account, deadline, None, first_attempt=result.attempts + 1
                )
                result.outcome = outcome
                result.attempts += attempts
                result.error = error
            pause = min(
                self.retry_cfg.backoff_max_seconds,
                self.retry_cfg.backoff_initial_seconds * 2 ** (check - 1),
            )
            if self._clock() + pause >= deadline:
                break
            await asyncio.sleep(pause)
        result.flat = False


def _flush_log(deferred: list[dict[str, Any]] | None) -> None:
    if deferred:
        for fields in deferred:
            log.info("cancel_all_attempted", **fields)
        deferred.clear()


def resolve_accounts(
    requested: Iterable[str] | None, configured: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Accounts a trip covers, and notes on why it was widened (fail safe).

    None, empty, or any unknown account means every configured account.
    """
    if requested is None:
        return configured, ()
    wanted = tuple(dict.fromkeys(requested))
    if not wanted:
        return configured, ("no accounts named: tripping all accounts",)
    unknown = [a for a in wanted if a not in configured]
    if unknown:
        # Bounded: a caller must not be able to grow log and audit lines at will.
        shown = [a[:64] for a in unknown[:10]]
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        return configured, (f"unknown accounts {shown}{more}: tripping all accounts",)
    return wanted, ()
