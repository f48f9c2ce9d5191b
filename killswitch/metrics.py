"""Metrics: every Prometheus metric of SPEC, built on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from killswitch import __version__

# Label values created at 0 up front. A series born at 1 hides its first event
# from increase()/rate(), so the first-ever auth error or trip would never alert.
TRIP_SOURCES = (
    "signal", "webhook", "alertmanager", "grafana", "pnl", "startup", "resweep", "cli",
)  # fmt: skip
CANCEL_OUTCOMES = (
    "accepted", "retryable_reject", "timeout", "http_error", "network_error",
    "rejected", "auth_error",
)  # fmt: skip
RETRY_REASONS = (
    "retryable_reject",
    "timeout",
    "http_error",
    "network_error",
    "rejected",
)
WRITTEN_FILES = ("state", "halt_file", "audit")

# Resolve milliseconds on the hot path (0.5 ms) up to a whole sweep deadline (30 s).
LATENCY_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
)  # fmt: skip


class Metrics:
    """Holds every killswitch_* metric; nothing touches the global REGISTRY."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tripped = Gauge(
            "killswitch_tripped", "1 while the account is tripped (latched)",
            ["account"], registry=registry,
        )  # fmt: skip
        self.trips = Counter(
            "killswitch_trips", "Trip requests seen, by trigger source",
            ["source"], registry=registry,
        )  # fmt: skip
        self.cancel_requests = Counter(
            "killswitch_cancel_requests", "Cancel-all attempts by outcome",
            ["account", "outcome"], registry=registry,
        )  # fmt: skip
        self.cancel_retries = Counter(
            "killswitch_cancel_retries", "Cancel-all retries by the reason retried",
            ["account", "reason"], registry=registry,
        )  # fmt: skip
        self.cancel_request_duration = Histogram(
            "killswitch_cancel_request_duration_seconds",
            "One cancel-all request, sent to answered",
            ["account"], buckets=LATENCY_BUCKETS_SECONDS, registry=registry,
        )  # fmt: skip
        self.sweep_duration = Histogram(
            "killswitch_sweep_duration_seconds",
            "Trip seen to every account of the sweep done (cancel, retry, verify)",
            buckets=LATENCY_BUCKETS_SECONDS, registry=registry,
        )  # fmt: skip
        self.trigger_to_wire = Histogram(
            "killswitch_trigger_to_wire_seconds",
            "Trigger seen to the last first-attempt cancel-all written to its socket",
            ["source"], buckets=LATENCY_BUCKETS_SECONDS, registry=registry,
        )  # fmt: skip
        self.open_orders = Gauge(
            "killswitch_open_orders", "Open orders left after verification",
            ["account"], registry=registry,
        )  # fmt: skip
        self.account_flat = Gauge(
            "killswitch_account_flat", "1 when verification saw no open orders",
            ["account"], registry=registry,
        )  # fmt: skip
        self.pnl = Gauge(
            "killswitch_pnl", "Last PnL value read", ["watcher"], registry=registry
        )
        self.pnl_age = Gauge(
            "killswitch_pnl_age_seconds", "Age of the last fresh PnL value",
            ["watcher"], registry=registry,
        )  # fmt: skip
        self.pnl_headroom = Gauge(
            "killswitch_pnl_headroom", "Distance to the nearest PnL limit; 0 = at it",
            ["watcher"], registry=registry,
        )  # fmt: skip
        self.pnl_read_errors = Counter(
            "killswitch_pnl_read_errors", "PnL file reads that failed or were garbled",
            ["watcher"], registry=registry,
        )  # fmt: skip
        self.http_requests = Counter(
            "killswitch_http_requests", "API requests by endpoint and status code",
            ["endpoint", "code"], registry=registry,
        )  # fmt: skip
        self.ems_up = Gauge(
            "killswitch_ems_up", "1 while the warm connection to the EMS answers",
            ["ems"], registry=registry,
        )  # fmt: skip
        self.last_trip_timestamp = Gauge(
            "killswitch_last_trip_timestamp_seconds", "Unix time of the last trip",
            registry=registry,
        )  # fmt: skip
        self.build_info = Gauge(
            "killswitch_build_info", "Always 1; the version is the label",
            ["version"], registry=registry,
        )  # fmt: skip
        self.build_info.labels(version=__version__).set(1)
        # Failures that never stop a sweep but must be visible (SPEC: "counted").
        self.state_write_errors = Counter(
            "killswitch_state_write_errors", "Failed writes: state, halt file, audit",
            ["file"], registry=registry,
        )  # fmt: skip
        for source in TRIP_SOURCES:
            self.trips.labels(source=source)
        for file in WRITTEN_FILES:
            self.state_write_errors.labels(file=file)

    def declare_accounts(self, accounts: tuple[str, ...]) -> None:
        """Create the per-account series at 0 so dashboards and alerts see every one."""
        for account in accounts:
            self.tripped.labels(account=account).set(0)
            self.cancel_request_duration.labels(account=account)
            for outcome in CANCEL_OUTCOMES:
                self.cancel_requests.labels(account=account, outcome=outcome)
            for reason in RETRY_REASONS:
                self.cancel_retries.labels(account=account, reason=reason)
