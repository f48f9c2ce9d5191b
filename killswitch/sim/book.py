"""The simulator's open orders per account, as `OrderExecutionReport` dicts."""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

#: Exchange symbol per bare exchange name, so each account's orders look like its own.
_SYMBOLS: dict[str, tuple[str, str]] = {
    "BINANCE": ("BTCUSDT", "BINANCE_SPOT_BTC_USDT"),
    "KRAKEN": ("XBT/USDT", "KRAKEN_SPOT_BTC_USDT"),
    "COINBASE": ("BTC-USD", "COINBASE_SPOT_BTC_USD"),
    "BITSTAMP": ("btcusd", "BITSTAMP_SPOT_BTC_USD"),
    "OKX": ("BTC-USDT", "OKEX_SPOT_BTC_USDT"),
    "BYBIT": ("BTCUSDT", "BYBITSPOT_SPOT_BTC_USDT"),
    "KUCOIN": ("BTC-USDT", "KUCOIN_SPOT_BTC_USDT"),
    "DERIBIT": ("BTC-PERPETUAL", "DERIBIT_PERP_BTC_USD"),
}
_DEFAULT_SYMBOL = ("BTC/USDT", "")
_ID_NAMESPACE = uuid.UUID("6ab36bc1-344d-432e-ac6d-0bf44ee64c2b")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class OrderBook:
    """Open orders per account, keyed by `client_order_id` in arrival order."""

    def __init__(self) -> None:
        self._open: dict[str, dict[str, dict[str, Any]]] = {}
        self._sequence = itertools.count(1)

    def clear(self) -> None:
        """Forget every order of every account."""
        self._open.clear()

    def seed(self, accounts: Iterable[str], per_account: int) -> None:
        """Give each of `accounts` `per_account` resting limit orders."""
        for exchange_id in accounts:
            self.add_generated(exchange_id, per_account)

    def add_generated(self, exchange_id: str, n: int) -> list[dict[str, Any]]:
        """Open `n` made-up limit orders on `exchange_id` and return their reports."""
        symbol, symbol_coinapi = _SYMBOLS.get(
            exchange_id.partition("/")[0], _DEFAULT_SYMBOL
        )
        added = []
        for _ in range(n):
            seq = next(self._sequence)
            request: dict[str, Any] = {
                "exchange_id": exchange_id,
                "client_order_id": f"{exchange_id.replace('/', '-')}-sim-{seq:06d}",
                "symbol_id_exchange": symbol,
                "side": "BUY" if seq % 2 else "SELL",
                "order_type": "LIMIT",
                "price": 50_000.0 + 10.0 * (seq % 50) * (-1 if seq % 2 else 1),
                "amount_order": round(0.01 * (1 + seq % 3), 8),
                "time_in_force": "GOOD_TILL_CANCEL",
            }
            if symbol_coinapi:
                request["symbol_id_coinapi"] = symbol_coinapi
            added.append(self._open_order(request, seq))
        return added

    def add(self, request: Mapping[str, Any]) -> dict[str, Any] | None:
        """Open the order an `OrderNewSingleRequest` describes.

        Returns:
            Its execution report (status NEW), or None when the account already has
            an open order with that `client_order_id`.
        """
        orders = self._open.get(request["exchange_id"], {})
        if request["client_order_id"] in orders:
            return None
        return self._open_order(request, next(self._sequence))

    def _open_order(self, request: Mapping[str, Any], seq: int) -> dict[str, Any]:
        client_order_id = request["client_order_id"]
        now = _now_iso()
        report = dict(request)
        report.update(
            client_order_id_format_exchange=str(
                uuid.uuid5(_ID_NAMESPACE, client_order_id)
            ),
            exchange_order_id=str(3_456_456_754 + seq),
            amount_open=request["amount_order"],
            amount_filled=0,
            status="NEW",
            status_history=[["RECEIVED", now], ["NEW", now]],
            time_order=now,
        )
        self._open.setdefault(request["exchange_id"], {})[client_order_id] = report
        return dict(report)

    def open_orders(self, exchange_id: str | None = None) -> list[dict[str, Any]]:
        """Return copies of the open orders of `exchange_id` (None: every account)."""
        if exchange_id is not None:
            return [dict(o) for o in self._open.get(exchange_id, {}).values()]
        return [dict(o) for orders in self._open.values() for o in orders.values()]

    def count(self, exchange_id: str) -> int:
        """Return how many orders `exchange_id` has open."""
        return len(self._open.get(exchange_id, ()))

    def cancel_all(self, exchange_id: str) -> int:
        """Cancel every open order of `exchange_id`; return how many there were."""
        return len(self._open.pop(exchange_id, ()))

    def cancel(
        self,
        exchange_id: str,
        *,
        client_order_id: str | None = None,
        exchange_order_id: str | None = None,
    ) -> dict[str, Any] | None:
        """Cancel one open order of `exchange_id`, found by either of its ids.

        Returns:
            Its final execution report (status CANCELED), or None if no open order of
            that account has the id.
        """
        orders = self._open.get(exchange_id, {})
        key = client_order_id if client_order_id in orders else None
        if key is None and exchange_order_id is not None:
            key = next(
                (
                    k
                    for k, o in orders.items()
                    if o["exchange_order_id"] == exchange_order_id
                ),
                None,
            )
        if key is None:
            return None
        report = orders.pop(key)
        if not orders:
            del self._open[exchange_id]
        report["status"] = "CANCELED"
        report["status_history"] = [*report["status_history"], ["CANCELED", _now_iso()]]
        return report
