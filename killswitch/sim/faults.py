"""The EMS simulator's faults: scripted rejects, per-account faults, latency."""

from __future__ import annotations

import collections
import dataclasses
import enum


class Default(enum.Enum):
    """Sentinel: "the reject reason that suits the status" (see `default_reason`)."""

    REASON = "default"


#: The reject reason a scripted failure carries when none is given, by status.
_DEFAULT_REASONS: dict[int, str] = {
    200: "EXCHANGE_RESPONSE_TIMEOUT",
    490: "EXCHANGE_UNREACHABLE",
    504: "EXCHANGE_RESPONSE_TIMEOUT",
}


def default_reason(status: int) -> str | None:
    """Return the reject reason a scripted failure with `status` carries by default.

    Args:
        status: the HTTP status the failure answers with.

    Returns:
        `EXCHANGE_RESPONSE_TIMEOUT` for 200 and 504, `EXCHANGE_UNREACHABLE` for 490,
        None (a body that is not a `MessageReject`) for every other status.
    """
    return _DEFAULT_REASONS.get(status)


@dataclasses.dataclass(frozen=True, slots=True)
class ScriptedFailure:
    """One queued cancel-all failure: the status and the reject reason it answers."""

    status: int
    reject_reason: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AccountFaults:
    """The standing faults of one account; see `Simulator.set_fault` for each one."""

    delay_seconds: float = 0.0
    hang: bool = False
    drop: bool = False
    garbage_body: bool = False
    huge_body_bytes: int = 0
    drip_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delay_seconds", "huge_body_bytes", "drip_seconds"):
            if getattr(self, name) < 0:
                msg = f"{name}: {getattr(self, name)!r} must be >= 0"
                raise ValueError(msg)


_NO_FAULTS = AccountFaults()


class FaultPlan:
    """Every fault the simulator injects: standing faults, queues and global latency."""

    def __init__(self) -> None:
        self.latency_seconds = 0.0
        self._standing: dict[str, AccountFaults] = {}
        self._failures: dict[str, collections.deque[ScriptedFailure]] = {}
        self._survivals: dict[str, int] = {}

    def clear(self) -> None:
        """Remove every fault, every queued failure and the global latency."""
        self.latency_seconds = 0.0
        self._standing.clear()
        self._failures.clear()
        self._survivals.clear()

    def standing(self, exchange_id: str | None) -> AccountFaults:
        """Return the standing faults of `exchange_id` (none for an unknown account)."""
        if exchange_id is None:
            return _NO_FAULTS
        return self._standing.get(exchange_id, _NO_FAULTS)

    def set_standing(
        self, exchange_id: str, faults: AccountFaults, *, survive_cancels: int
    ) -> None:
        """Replace the standing faults and the survival count of `exchange_id`.

        Raises:
            ValueError: `survive_cancels` is negative.
        """
        if survive_cancels < 0:
            msg = f"survive_cancels: {survive_cancels!r} must be >= 0"
            raise ValueError(msg)
        if faults == _NO_FAULTS:
            self._standing.pop(exchange_id, None)
        else:
            self._standing[exchange_id] = faults
        self._survivals[exchange_id] = survive_cancels

    def is_plain(self, exchange_id: str) -> bool:
        """True when `exchange_id` has no standing fault, survival or queued failure."""
        return (
            exchange_id not in self._standing
            and not self._survivals.get(exchange_id, 0)
            and not self._failures.get(exchange_id)
        )

    def delay_seconds(self, exchange_id: str | None) -> float:
        """Return the latency added to a request: the global one plus the account's."""
        return self.latency_seconds + self.standing(exchange_id).delay_seconds

    def push_failures(self, exchange_id: str, n: int, failure: ScriptedFailure) -> None:
        """Queue `n` copies of `failure` behind any already queued for `exchange_id`.

        Raises:
            ValueError: `n` is negative or the status is not an HTTP status.
        """
        if n < 0:
            msg = f"n: {n!r} must be >= 0"
            raise ValueError(msg)
        if not 200 <= failure.status <= 599:
            msg = f"status: {failure.status!r} must be in 200..599"
            raise ValueError(msg)
        if failure.status == 200 and not failure.reject_reason:
            msg = "status 200 needs a reject_reason (a 200 without one is a success)"
            raise ValueError(msg)
        self._failures.setdefault(exchange_id, collections.deque()).extend(
            [failure] * n
        )

    def pop_failure(self, exchange_id: str) -> ScriptedFailure | None:
        """Take the next queued failure of `exchange_id`, if any."""
        queue = self._failures.get(exchange_id)
        return queue.popleft() if queue else None

    def take_survival(self, exchange_id: str) -> bool:
        """Consume one pending survival of `exchange_id`; False when none is left."""
        left = self._survivals.get(exchange_id, 0)
        if left <= 0:
            return False
        self._survivals[exchange_id] = left - 1
        return True
