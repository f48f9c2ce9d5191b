"""The KillswitchError tree: every domain error the daemon raises."""


class KillswitchError(Exception):
    """Base of every error killswitch raises on purpose."""


class ConfigError(KillswitchError):
    """The configuration is invalid; `problems` lists every one with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class TriggerError(KillswitchError):
    """A trigger's input is unusable (an unparsable PnL file, a broken payload)."""


class EmsError(KillswitchError):
    """An EMS call for one exchange account failed."""

    def __init__(self, message: str, *, exchange_id: str, outcome: str) -> None:
        self.exchange_id = exchange_id
        self.outcome = outcome
        super().__init__(message)


class EmsUnavailableError(EmsError):
    """Transient: connect error, timeout, 5xx, 429, 490, unreachable rejects."""

    def __init__(
        self,
        message: str,
        *,
        exchange_id: str,
        outcome: str,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message, exchange_id=exchange_id, outcome=outcome)


class EmsRejectedError(EmsError):
    """Final: 400, 401/403 and the other reject reasons (OTHER is retried a little)."""

    def __init__(
        self, message: str, *, exchange_id: str, outcome: str, reject_reason: str | None
    ) -> None:
        self.reject_reason = reject_reason
        super().__init__(message, exchange_id=exchange_id, outcome=outcome)


class StateError(KillswitchError):
    """The persisted state file exists but cannot be read or parsed."""
