"""Simulator: the scriptable state behind the EMS simulator (book, faults, record)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from killswitch.sim.book import OrderBook
from killswitch.sim.faults import (
    AccountFaults,
    Default,
    FaultPlan,
    ScriptedFailure,
    default_reason,
)

#: The demo's eight accounts: what `killswitch ems-sim` serves unless told otherwise.
DEMO_ACCOUNTS: tuple[str, ...] = (
    "BINANCE",
    "KRAKEN/JOHN",
    "COINBASE",
    "BITSTAMP/2574",
    "OKX",
    "BYBIT/DESK1",
    "KUCOIN",
    "DERIBIT/OPT",
)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One EMS request as the simulator received it, before any fault was applied.

    Attributes:
        method: the HTTP method.
        path: the URL path without the query string (`/v1/orders`).
        exchange_id: the account named by the body or the `exchange_id` query
            parameter; None when the request names none (or names it wrongly).
        received_monotonic: the simulator clock (`time.monotonic()` by default, which
            is shared between processes) when the request reached the handler.
        headers: the request headers, case-insensitive, API key included.
        body: the raw request body.
    """

    method: str
    path: str
    exchange_id: str | None
    received_monotonic: float
    headers: Mapping[str, str]
    body: bytes


class Simulator:
    """A scriptable CoinAPI EMS: open orders per account, faults and a request record.

    Serve it with `running_simulator` (or `create_sim_app`). Every method is meant to
    be called from the event loop that serves it (or before serving starts).

    Attributes:
        accounts: the accounts seeded with orders (any other account is accepted and
            simply has none).
        api_key: the `X-CoinAPI-Key` every EMS request must carry; None for none.
        orders_per_account: how many orders each account gets at a (re)seed.
        clock: what `RecordedRequest.received_monotonic` is read from.
        requests: every EMS request received (not the `/_sim/` ones), in order.
        book: the open orders.
        faults: the injected faults.
    """

    def __init__(
        self,
        accounts: Iterable[str] = (),
        *,
        api_key: str | None = None,
        orders_per_account: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accounts: tuple[str, ...] = tuple(accounts)
        self.api_key = api_key
        self.orders_per_account = orders_per_account
        self.clock = clock
        self.requests: list[RecordedRequest] = []
        self._waiters: set[asyncio.Future[None]] = set()
        self.book = OrderBook()
        self.faults = FaultPlan()
        self.book.seed(self.accounts, orders_per_account)

    def fail_next(
        self,
        exchange_id: str,
        n: int,
        *,
        status: int = 200,
        reject_reason: str | Default | None = Default.REASON,
    ) -> None:
        """Make the next `n` cancel-alls of `exchange_id` fail (and cancel nothing).

        Failures queue up behind any already scripted. What a failure answers:
        400 an ASP.NET `ValidationError`; any other status with a reject reason a
        `MessageReject` carrying it (content type `appliction/json` for 490 and 504,
        as the spec writes it); without a reject reason an empty body for 401/403 and
        a text body otherwise. 429 also carries `Retry-After: 1`.

        Args:
            exchange_id: the account.
            n: how many cancel-alls fail.
            status: the HTTP status they answer.
            reject_reason: the `MessageReject.reject_reason`; by default
                `EXCHANGE_RESPONSE_TIMEOUT` for 200 and 504, `EXCHANGE_UNREACHABLE`
                for 490 and none for the other statuses.

        Raises:
            ValueError: `n` is negative, `status` is not in 200..599, or a 200 has no
                reject reason (it would be a success).
        """
        reason = (
            default_reason(status) if reject_reason is Default.REASON else reject_reason
        )
        self.faults.push_failures(exchange_id, n, ScriptedFailure(status, reason))

    def set_fault(
        self,
        exchange_id: str,
        *,
        delay_seconds: float = 0.0,
        hang: bool = False,
        drop: bool = False,
        survive_cancels: int = 0,
        garbage_body: bool = False,
        huge_body_bytes: int = 0,
        drip_seconds: float = 0.0,
    ) -> None:
        """Replace the standing faults of `exchange_id` (no arguments: clear them).

        `delay_seconds` applies to every EMS request naming the account; the other
        faults apply to its cancel-alls only, after any `fail_next` failure, so that
        its open orders can still be listed.

        Args:
            exchange_id: the account.
            delay_seconds: latency added before answering.
            hang: never answer; the handler ends when the client disconnects or the
                server shuts down.
            drop: close the connection without answering (orders stay open).
            survive_cancels: the next k cancel-alls answer success but leave the
                orders open.
            garbage_body: answer 200 with a body that is not JSON (orders are
                cancelled: only the reply is broken).
            huge_body_bytes: pad the success body with trailing whitespace to at least
                this many bytes (it stays valid JSON).
            drip_seconds: send the success body in ten pieces spread over this time.

        Raises:
            ValueError: a number is negative.
        """
        faults = AccountFaults(
            delay_seconds=delay_seconds,
            hang=hang,
            drop=drop,
            garbage_body=garbage_body,
            huge_body_bytes=huge_body_bytes,
            drip_seconds=drip_seconds,
        )
        self.faults.set_standing(exchange_id, faults, survive_cancels=survive_cancels)

    def set_latency(self, delay_seconds: float) -> None:
        """Add `delay_seconds` before answering every EMS request, on top of any delay.

        Raises:
            ValueError: `delay_seconds` is negative.
        """
        if delay_seconds < 0:
            msg = f"delay_seconds: {delay_seconds!r} must be >= 0"
            raise ValueError(msg)
        self.faults.latency_seconds = delay_seconds

    def add_orders(self, exchange_id: str, n: int) -> None:
        """Open `n` more made-up limit orders on `exchange_id`."""
        self.book.add_generated(exchange_id, n)

    def open_orders(self, exchange_id: str) -> list[dict[str, Any]]:
        """Return copies of the open `OrderExecutionReport`s of `exchange_id`."""
        return self.book.open_orders(exchange_id)

    def reset(
        self,
        *,
        accounts: Iterable[str] | None = None,
        orders_per_account: int | None = None,
    ) -> None:
        """Clear every fault (latency too) and the request record, then re-seed orders.

        Args:
            accounts: replace the seeded accounts; None keeps them.
            orders_per_account: replace the orders per account; None keeps it.
        """
        if accounts is not None:
            self.accounts = tuple(accounts)
        if orders_per_account is not None:
            self.orders_per_account = orders_per_account
        self.faults.clear()
        self.requests.clear()
        self.book.clear()
        self.book.seed(self.accounts, self.orders_per_account)

    async def wait_for_requests(
        self,
        predicate: Callable[[list[RecordedRequest]], bool],
        timeout_seconds: float = 5.0,
    ) -> None:
        """Return once `predicate(self.requests)` holds, re-checked at each request.

        Raises:
            TimeoutError: it still does not hold after `timeout_seconds`.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_seconds):
                while not predicate(self.requests):
                    waiter = loop.create_future()
                    self._waiters.add(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiters.discard(waiter)
        except TimeoutError:
            msg = (
                f"simulator: condition not met within {timeout_seconds}s "
                f"({len(self.requests)} requests recorded)"
            )
            raise TimeoutError(msg) from None

    def record(self, request: RecordedRequest) -> None:
        """Append `request` to the record (the app calls this) and wake the waiters."""
        self.requests.append(request)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
