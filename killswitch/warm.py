"""Keep one pooled connection per account warm, and report killswitch_ems_up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from killswitch.ems import EmsClient
from killswitch.errors import EmsError
from killswitch.metrics import Metrics

log = structlog.get_logger()

# Well inside common server keep-alive timeouts (60-75 s) and ours (60 s).
KEEP_WARM_INTERVAL_SECONDS = 5.0
# Until the first probe succeeds, try again sooner: the EMS may come up late.
COLD_RETRY_SECONDS = 1.0


class KeepWarm:
    """Probes every account of every EMS at once, so the pool holds N live sockets."""

    def __init__(
        self,
        client: Callable[[], EmsClient],
        accounts_by_ems: Callable[[], Mapping[str, tuple[str, ...]]],
        metrics: Metrics,
        on_state: Callable[[str, bool], None],
        *,
        is_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._client = client
        self._accounts_by_ems = accounts_by_ems
        self._metrics = metrics
        self._on_state = on_state
        self._is_busy = is_busy
        self._up: dict[str, bool] = {}

    async def probe_all(self) -> bool:
        """Probe once; True when every EMS answered."""
        groups = self._accounts_by_ems()
        client = self._client()
        results = await asyncio.gather(
            *(
                self._probe_ems(client, ems, accounts)
                for ems, accounts in groups.items()
            )
        )
        return all(results)

    async def _probe_ems(
        self, client: EmsClient, ems: str, accounts: tuple[str, ...]
    ) -> bool:
        outcomes = await asyncio.gather(
            *(client.probe(a) for a in accounts), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for error in errors:
            if not isinstance(error, EmsError):
                raise error  # a bug, not an EMS problem: let it unwind
        up = len(errors) < len(outcomes)  # one answering connection: the EMS is up
        if self._up.get(ems) != up:
            event = "ems_up" if up else "ems_down"
            log.log(
                20 if up else 40, event, ems=ems, errors=[str(e) for e in errors[:3]]
            )
        self._up[ems] = up
        self._metrics.ems_up.labels(ems=ems).set(int(up))
        self._on_state(ems, up)
        return up

    async def run(self) -> None:
        """Probe forever; skip a round while a sweep uses the connections."""
        while True:
            all_up = True
            if not self._is_busy():
                all_up = await self.probe_all()
            await asyncio.sleep(
                KEEP_WARM_INTERVAL_SECONDS if all_up else COLD_RETRY_SECONDS
            )
