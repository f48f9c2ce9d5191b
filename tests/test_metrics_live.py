"""/metrics of the real daemon: promtool-valid, SPEC names and labels, live values."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from killswitch import __version__
from killswitch.metrics import LATENCY_BUCKETS_SECONDS, TRIP_SOURCES
from killswitch.triggers import Source
from tests.conftest import ACCOUNTS, RunningSim
from tests.deploy.test_deploy_files import (
    HISTOGRAM_SUFFIXES,
    SPEC_METRICS,
    allowed_sample_names,
    referenced_metric_names,
)
from tests.processes import SECRETS, DaemonProcess, write_config

PROMTOOL_TIMEOUT_SECONDS = 30.0
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.05
RETRIED = "KRAKEN/JOHN"
WATCHER = "desk"

# SPEC.md "Metrics": the labels of each name (histograms add `le` to _bucket).
SPEC_LABELS: dict[str, frozenset[str]] = {
    "killswitch_tripped": frozenset({"account"}),
    "killswitch_trips_total": frozenset({"source"}),
    "killswitch_cancel_requests_total": frozenset({"account", "outcome"}),
    "killswitch_cancel_retries_total": frozenset({"account", "reason"}),
    "killswitch_cancel_request_duration_seconds": frozenset({"account"}),
    "killswitch_sweep_duration_seconds": frozenset(),
    "killswitch_trigger_to_wire_seconds": frozenset({"source"}),
    "killswitch_open_orders": frozenset({"account"}),
    "killswitch_account_flat": frozenset({"account"}),
    "killswitch_pnl": frozenset({"watcher"}),
    "killswitch_pnl_age_seconds": frozenset({"watcher"}),
    "killswitch_pnl_headroom": frozenset({"watcher"}),
    "killswitch_pnl_read_errors_total": frozenset({"watcher"}),
    "killswitch_http_requests_total": frozenset({"endpoint", "code"}),
    "killswitch_ems_up": frozenset({"ems"}),
    "killswitch_last_trip_timestamp_seconds": frozenset(),
    "killswitch_build_info": frozenset({"version"}),
}
# Beyond SPEC's table, on purpose: SPEC says failed state writes are "counted".
EXTRA_SAMPLE_NAMES = frozenset({"killswitch_state_write_errors_total"})


class Scrape:
    """One /metrics page, parsed, with its samples grouped by sample name."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        for family in self.families:
            for sample in family.samples:
                self.samples[sample.name].append(sample)

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample with exactly these labels, None if absent."""
        found = [s.value for s in self.samples.get(name, []) if s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def label_sets(self, name: str) -> set[frozenset[str]]:
        """The label names each sample of `name` carries."""
        return {frozenset(s.labels) for s in self.samples.get(name, [])}


def promtool_check(text: str) -> None:
    """`promtool check metrics` accepts the page (skip without promtool, unless CI)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must have it")
        pytest.skip(reason)
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool check metrics: {output}\n{text}"
    assert output.strip() == "", output


async def scrape(daemon: DaemonProcess) -> Scrape:
    """GET /metrics without a token, checked by promtool."""
    status, body = await daemon.request("GET", "/metrics")
    assert status == 200, body
    assert isinstance(body, str), body
    promtool_check(body)
    return Scrape(body)


async def scrape_until(
    daemon: DaemonProcess, predicate: Callable[[Scrape], bool]
) -> Scrape:
    """Scrape (bounded) until `predicate` holds for the page."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        page = await scrape(daemon)
        if predicate(page):
            return page
        assert time.monotonic() < deadline, f"not seen in /metrics:\n{page.text}"
        await asyncio.sleep(POLL_SECONDS)


@dataclass
class TripScrapes:
    """The daemon and its /metrics before the trip, after the sweep, after the reset."""

    daemon: DaemonProcess
    armed: Scrape
    tripped: Scrape
    reset: Scrape


@pytest.fixture
async def trip_scrapes(
    ems_sim: RunningSim, tmp_path: Path
) -> AsyncIterator[TripScrapes]:
    """Run the real daemon through SIGUSR1 (one 490 on KRAKEN/JOHN) and a reset."""
    pnl_file = tmp_path / "pnl.json"
    pnl_file.write_text('{"pnl": 100}')
    config_path = tmp_path / "killswitch.yaml"
    write_config(
        config_path, ems_sim.base_url, ACCOUNTS,
        triggers={
            "signal": True,
            "pnl": [{"name": WATCHER, "path": str(pnl_file), "field": "pnl",
                     "max_loss": 1000, "stale_after_seconds": 600,
                     "poll_interval_seconds": 0.05}],
        },
    )  # fmt: skip
    daemon = DaemonProcess(config_path).start()
    try:
        await daemon.wait_ready()
        armed = await scrape_until(
            daemon, lambda p: p.value("killswitch_ems_up", ems="default") == 1
        )
        ems_sim.sim.fail_next(RETRIED, 1, status=490)
        daemon.send(signal.SIGUSR1)
        await daemon.wait_for_event("fanout_finished", source="signal")
        tripped = await scrape(daemon)
        status, body = await daemon.request(
            "POST", "/v1/reset", token=SECRETS["TEST_ONCALL_TOKEN"],
            json_body={"reason": "metrics test over"},
        )  # fmt: skip
        assert status == 200, body
        reset = await scrape(daemon)
        yield TripScrapes(daemon, armed, tripped, reset)
    finally:
        daemon.stop()


def spec_sample_names(name: str) -> tuple[str, ...]:
    """The sample names SPEC's metric `name` is exposed as."""
    if SPEC_METRICS[name] == "histogram":
        return tuple(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return (name,)


def assert_spec_labels(page: Scrape, name: str) -> None:
    """`name` has samples, and each carries exactly SPEC's labels."""
    for sample_name in spec_sample_names(name):
        expected = SPEC_LABELS[name] | (
            {"le"} if sample_name.endswith("_bucket") else set()
        )
        assert page.label_sets(sample_name) == {expected}, sample_name


def test_metrics_spec_label_table_matches_the_spec_metric_table():
    """This file's label table names exactly the metrics of SPEC's table."""
    assert set(SPEC_LABELS) == set(SPEC_METRICS)
    assert set(TRIP_SOURCES) == set(get_args(Source))


async def test_metrics_live_values_follow_a_trip_a_retry_and_a_reset(
    trip_scrapes: TripScrapes,
):
    """Tripped goes 0 -> 1 -> 0; one signal trip, one retry, flat accounts, timings."""
    armed, tripped, reset = trip_scrapes.armed, trip_scrapes.tripped, trip_scrapes.reset
    for account in ACCOUNTS:
        assert armed.value("killswitch_tripped", account=account) == 0
        assert tripped.value("killswitch_tripped", account=account) == 1
        assert reset.value("killswitch_tripped", account=account) == 0
        assert tripped.value("killswitch_account_flat", account=account) == 1
        assert tripped.value("killswitch_open_orders", account=account) == 0
        accepted = {"account": account, "outcome": "accepted"}
        assert armed.value("killswitch_cancel_requests_total", **accepted) == 0
        assert tripped.value("killswitch_cancel_requests_total", **accepted) == 1
        attempts = 2 if account == RETRIED else 1
        assert (
            tripped.value(
                "killswitch_cancel_request_duration_seconds_count", account=account
            )
            == attempts
        )
    retry = {"account": RETRIED, "reason": "retryable_reject"}
    assert armed.value("killswitch_cancel_retries_total", **retry) == 0
    assert tripped.value("killswitch_cancel_retries_total", **retry) == 1
    assert (
        tripped.value(
            "killswitch_cancel_requests_total",
            account=RETRIED,
            outcome="retryable_reject",
        )
        == 1
    )
    assert armed.value("killswitch_trips_total", source="signal") == 0
    assert tripped.value("killswitch_trips_total", source="signal") == 1
    assert reset.value("killswitch_trips_total", source="signal") == 1
    assert (
        armed.value("killswitch_trigger_to_wire_seconds_count", source="signal") is None
    )
    assert (
        tripped.value("killswitch_trigger_to_wire_seconds_count", source="signal") == 1
    )
    assert armed.value("killswitch_sweep_duration_seconds_count") == 0
    assert tripped.value("killswitch_sweep_duration_seconds_count") == 1
    assert tripped.value("killswitch_ems_up", ems="default") == 1
    assert armed.value("killswitch_last_trip_timestamp_seconds") == 0
    trip_time = tripped.value("killswitch_last_trip_timestamp_seconds")
    assert trip_time is not None
    assert 0 < time.time() - trip_time < 60
    assert reset.value("killswitch_last_trip_timestamp_seconds") == trip_time
    assert tripped.value("killswitch_build_info", version=__version__) == 1
    metrics_ok = {"endpoint": "/metrics", "code": "200"}
    assert (tripped.value("killswitch_http_requests_total", **metrics_ok) or 0) >= 1
    assert (
        reset.value("killswitch_http_requests_total", endpoint="/v1/reset", code="200")
        == 1
    )


async def test_metrics_live_has_every_spec_name_with_its_labels(
    trip_scrapes: TripScrapes,
):
    """After a trip, every SPEC metric has samples, each with exactly SPEC's labels."""
    page = trip_scrapes.tripped
    types = {family.name: family.type for family in page.families}
    for name, kind in SPEC_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types.get(family) == kind, name
        assert_spec_labels(page, name)


async def test_metrics_live_pnl_watcher_series_show_the_file(trip_scrapes: TripScrapes):
    """The PnL watcher exposes the file's value, its headroom and no read errors."""
    page = trip_scrapes.tripped
    age = page.value("killswitch_pnl_age_seconds", watcher=WATCHER)
    assert age is not None
    assert 0 <= age < 60
    assert page.value("killswitch_pnl", watcher=WATCHER) == 100
    assert page.value("killswitch_pnl_headroom", watcher=WATCHER) == 1100
    assert page.value("killswitch_pnl_read_errors_total", watcher=WATCHER) == 0


async def test_metrics_live_has_every_name_the_deploy_files_query(
    trip_scrapes: TripScrapes,
):
    """Every killswitch_* name of the alert rules and dashboard is on the live page."""
    referenced = referenced_metric_names()
    assert referenced
    assert referenced - set(trip_scrapes.tripped.samples) == set()


async def test_metrics_live_exposes_only_killswitch_metrics(trip_scrapes: TripScrapes):
    """No python_gc_*, process_* or other global-REGISTRY noise; only SPEC's names."""
    page = trip_scrapes.tripped
    assert [f.name for f in page.families if not f.name.startswith("killswitch_")] == []
    names = {n for n in page.samples if not n.endswith("_created")}
    assert names - allowed_sample_names() - EXTRA_SAMPLE_NAMES == set()


async def test_metrics_live_histogram_buckets_resolve_milliseconds(
    trip_scrapes: TripScrapes,
):
    """Every latency histogram has buckets from 0.5 ms to 30 s, several below 10 ms."""
    page = trip_scrapes.tripped
    for name in (
        "killswitch_cancel_request_duration_seconds_bucket",
        "killswitch_sweep_duration_seconds_bucket",
        "killswitch_trigger_to_wire_seconds_bucket",
    ):
        bounds = sorted({float(s.labels["le"]) for s in page.samples[name]})
        assert bounds == [*LATENCY_BUCKETS_SECONDS, float("inf")], name
    assert LATENCY_BUCKETS_SECONDS[0] == 0.0005
    assert LATENCY_BUCKETS_SECONDS[-1] == 30.0
    assert len([b for b in LATENCY_BUCKETS_SECONDS if b < 0.01]) >= 5
