"""Alertmanager: v4 payloads unit-tested, then the real Alertmanager against the daemon.

The end-to-end half starts Debian's `prometheus-alertmanager` on 127.0.0.1 with a
webhook receiver pointing at the real `killswitch run` process, fires alerts with
`amtool`, and watches the daemon's log, status and the EMS simulator.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from killswitch.errors import TriggerError
from killswitch.triggers.alerts import firing_trip, parse_payload
from tests.conftest import ACCOUNTS, RunningSim
from tests.processes import SECRETS, DaemonProcess, free_port, write_config
from tests.test_http import TRIP_TOKEN, Api, api_config, serving_api, wait_until

CANCEL = "/v1/orders/cancel/all"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
AMTOOL = "/usr/bin/amtool"
DELIVERY_SECONDS = 15.0  # Alertmanager delivers in about a second; be generous


# --- v4 payloads and firing_trip() -------------------------------------------


def am_alert(status: str = "firing", **labels: str) -> dict[str, Any]:
    """One alert as Alertmanager's webhook v4 carries it."""
    return {
        "status": status,
        "labels": {"alertname": "DeskLoss", "severity": "critical", **labels},
        "annotations": {"summary": "desk PnL below the loss limit"},
        "startsAt": "2026-03-02T10:15:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z"
        if status == "firing"
        else "2026-03-02T10:20:00.000Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=desk_pnl",
        "fingerprint": "a8f3b6f0c2d1e4a5",
    }


def am_payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    """A whole Alertmanager webhook v4 body around `alerts`."""
    firing = any(a.get("status") == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DeskLoss"}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": "killswitch",
        "groupLabels": {"alertname": "DeskLoss"},
        "commonLabels": {"alertname": "DeskLoss"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


CRITICAL = {"severity": "critical"}


def test_firing_trip_critical_alert_trips_every_account() -> None:
    """One firing alert matching the labels trips, unscoped (every account)."""
    trip = firing_trip(am_payload(am_alert()), CRITICAL, "alertmanager", "risk")
    assert trip is not None
    assert (trip.source, trip.accounts, trip.actor) == ("alertmanager", None, "risk")
    assert trip.reason == "alertmanager alert firing: DeskLoss"


@pytest.mark.parametrize(
    "alerts",
    [
        [am_alert(severity="warning")],
        [am_alert(status="resolved")],
        [am_alert(status="resolved"), am_alert(severity="page")],
        [],
        [{"status": "firing"}],  # no labels at all
        [{"status": "firing", "labels": ["severity", "critical"]}],
        [{"status": "FIRING", "labels": {"severity": "critical"}}],
        [{"labels": {"severity": "critical"}}],  # no status
    ],
    ids=["warning", "resolved", "resolved-and-other", "none", "no-labels",
         "labels-list", "status-case", "no-status"],
)  # fmt: skip
def test_firing_trip_ignores_resolved_and_non_matching_alerts(
    alerts: list[dict[str, Any]],
) -> None:
    """Resolved alerts, other labels and malformed alerts never trip (nor reset)."""
    assert firing_trip(am_payload(*alerts), CRITICAL, "alertmanager", None) is None


def test_firing_trip_empty_match_trips_on_any_firing_alert() -> None:
    """`match: {}` matches every firing alert."""
    trip = firing_trip(am_payload(am_alert(severity="info")), {}, "alertmanager", None)
    assert trip is not None


def test_firing_trip_scopes_to_accounts_label() -> None:
    """killswitch_accounts="A, B" scopes the trip to those accounts, de-duplicated."""
    doc = am_payload(
        am_alert(killswitch_accounts="COINBASE, KRAKEN/JOHN"),
        am_alert(alertname="Other", killswitch_accounts="COINBASE"),
    )
    trip = firing_trip(doc, CRITICAL, "alertmanager", None)
    assert trip is not None
    assert trip.accounts == ("COINBASE", "KRAKEN/JOHN")
    assert trip.reason == "alertmanager alert firing: DeskLoss, Other"


def test_firing_trip_one_unscoped_alert_widens_to_every_account() -> None:
    """A scoped alert next to an unscoped one: the trip covers every account."""
    doc = am_payload(am_alert(killswitch_accounts="COINBASE"), am_alert())
    trip = firing_trip(doc, CRITICAL, "alertmanager", None)
    assert trip is not None
    assert trip.accounts is None


def test_firing_trip_blank_accounts_label_widens_to_every_account() -> None:
    """An empty killswitch_accounts label is no scope at all: every account."""
    trip = firing_trip(
        am_payload(am_alert(killswitch_accounts="  ")), CRITICAL, "alertmanager", None
    )
    assert trip is not None
    assert trip.accounts is None


def test_firing_trip_notes_alerts_that_are_not_objects() -> None:
    """Junk entries in `alerts` are noted and skipped; a real match still trips."""
    doc = am_payload(am_alert())
    doc["alerts"].insert(0, "junk")
    trip = firing_trip(doc, CRITICAL, "alertmanager", None)
    assert trip is not None
    assert trip.notes == ("alerts[0] is not an object; ignored",)


def test_firing_trip_reason_is_bounded() -> None:
    """Thousands of alert names do not make an unbounded reason."""
    doc = am_payload(*(am_alert(alertname=f"A{i:05}") for i in range(5000)))
    trip = firing_trip(doc, CRITICAL, "alertmanager", None)
    assert trip is not None
    assert len(trip.reason) <= 500


@pytest.mark.parametrize(
    "body",
    [b"", b"nope", b"[]", b'{"alerts": {}}', b'{"version": "4"}', b"[" * 50_000],
    ids=["empty", "text", "list", "alerts-object", "no-alerts", "deep"],
)
def test_parse_payload_rejects_unusable_bodies(body: bytes) -> None:
    """parse_payload raises TriggerError (never anything else) for unusable bodies."""
    with pytest.raises(TriggerError):
        parse_payload(body, "alertmanager")


async def test_alertmanager_duplicate_delivery_trips_again_without_overlap(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """The same delivery twice trips twice; each account's requests never overlap."""
    delay = 0.2
    for account in ACCOUNTS:
        ems_sim.sim.set_fault(account, delay_seconds=delay)
    cfg = api_config(ems_sim.base_url, tmp_path)
    async with serving_api(ems_sim, cfg) as api:
        payload = am_payload(am_alert())
        code, first = await api.call(
            "POST", "/v1/alertmanager", token=TRIP_TOKEN, body=payload
        )
        assert code == 200
        await api.wait_cancelled()  # the first sweep is in flight (delayed EMS)
        code, second = await api.call(
            "POST", "/v1/alertmanager", token=TRIP_TOKEN, body=payload
        )
        assert (code, second["tripped"]) == (200, True)
        assert second["trip_id"] != first["trip_id"]
        assert sorted(second["coalesced"]) == sorted(ACCOUNTS)
        assert api.sample("killswitch_trips_total", {"source": "alertmanager"}) == 2
        await wait_until(lambda: len(api.cancels()) == 2 * len(ACCOUNTS), 10.0)
        await api.wait_idle()
        for account in ACCOUNTS:
            assert_no_overlap(api, account, delay)


async def test_alertmanager_simultaneous_duplicates_share_one_sweep(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """Two identical deliveries at once: both trips counted, one request per account."""
    cfg = api_config(ems_sim.base_url, tmp_path)
    async with serving_api(ems_sim, cfg) as api:
        payload = am_payload(am_alert())
        replies = await asyncio.gather(
            *(
                api.call("POST", "/v1/alertmanager", token=TRIP_TOKEN, body=payload)
                for _ in range(2)
            )
        )
        assert [code for code, _ in replies] == [200, 200]
        assert api.sample("killswitch_trips_total", {"source": "alertmanager"}) == 2
        await api.wait_cancelled()
        await api.wait_idle()
        for account in ACCOUNTS:
            assert 1 <= len(api.cancels(account)) <= 2


def assert_no_overlap(api: Api, account: str, delay: float) -> None:
    """Each EMS request of `account` arrived after the previous one was answered."""
    times = [r.received_monotonic for r in api.sim.sim.requests
             if r.exchange_id == account]  # fmt: skip
    assert len(times) >= 2
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= delay * 0.9, (account, gaps)


async def test_alertmanager_unreadable_payload_trips_everything(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """An authenticated Alertmanager body we cannot read fails safe: all accounts."""
    cfg = api_config(ems_sim.base_url, tmp_path)
    async with serving_api(ems_sim, cfg) as api:
        code, body = await api.call(
            "POST", "/v1/alertmanager", token=TRIP_TOKEN, data=b'{"alerts": 1}'
        )
        assert (code, body["tripped"]) == (200, True)
        assert sorted(body["accounts"]) == sorted(ACCOUNTS)
        await api.wait_cancelled()


async def test_alertmanager_resolved_delivery_does_not_reset(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """A resolved notification after a trip leaves every account tripped."""
    cfg = api_config(ems_sim.base_url, tmp_path)
    async with serving_api(ems_sim, cfg) as api:
        await api.call(
            "POST", "/v1/alertmanager", token=TRIP_TOKEN, body=am_payload(am_alert())
        )
        code, body = await api.call(
            "POST", "/v1/alertmanager", token=TRIP_TOKEN,
            body=am_payload(am_alert(status="resolved")),
        )  # fmt: skip
        assert (code, body["tripped"]) == (200, False)
        assert api.switch.latch.tripped_accounts == ACCOUNTS
        assert api.sample("killswitch_trips_total", {"source": "alertmanager"}) == 1


# --- the real Alertmanager ---------------------------------------------------


def require_alertmanager() -> None:
    """Skip without the binaries, except under CI, where that is a failure."""
    missing = [b for b in (ALERTMANAGER, AMTOOL) if shutil.which(b) is None]
    if not missing:
        return
    reason = (
        f"{', '.join(missing)} not installed (apt-get install prometheus-alertmanager)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the Alertmanager tests: {reason}")
    pytest.skip(reason)


@dataclass
class RealAlertmanager:
    """A running Alertmanager and the daemon its webhook receiver points at."""

    url: str
    daemon: DaemonProcess
    proc: subprocess.Popen[bytes]
    log_path: Path

    async def fire(self, *labels: str, start: str | None = None,
                   end: str | None = None) -> None:  # fmt: skip
        """`amtool alert add` (as a subprocess, so this loop keeps serving the EMS)."""
        argv = [AMTOOL, "alert", "add", f"--alertmanager.url={self.url}", *labels]
        if start is not None:
            argv.append(f"--start={start}")
        if end is not None:
            argv.append(f"--end={end}")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        async with asyncio.timeout(DELIVERY_SECONDS):
            out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode(errors="replace")

    async def deliveries(self) -> float:
        """Webhook deliveries the daemon answered 200, from its own /metrics."""
        status, text = await self.daemon.request("GET", "/metrics")
        assert status == 200
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "killswitch_http_requests_total"
                    and sample.labels.get("endpoint") == "/v1/alertmanager"
                    and sample.labels.get("code") == "200"
                ):
                    return sample.value
        return 0.0

    async def wait_deliveries(self, count: int) -> None:
        deadline = time.monotonic() + DELIVERY_SECONDS
        while await self.deliveries() < count:
            if time.monotonic() > deadline:
                log = self.log_path.read_text()[-3000:]
                msg = f"Alertmanager delivered fewer than {count} times:\n{log}"
                raise AssertionError(msg)
            await asyncio.sleep(0.05)

    async def status(self) -> dict[str, Any]:
        code, body = await self.daemon.request(
            "GET", "/v1/status", token=SECRETS["TEST_ONCALL_TOKEN"]
        )
        assert code == 200
        return dict(body)


def write_alertmanager_config(path: Path, daemon_listen: str, token_file: Path) -> None:
    doc = {
        "route": {
            "receiver": "killswitch",
            "group_by": ["alertname"],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{
            "name": "killswitch",
            "webhook_configs": [{
                "url": f"http://{daemon_listen}/v1/alertmanager",
                "send_resolved": True,
                "http_config": {"authorization": {
                    "type": "Bearer", "credentials_file": str(token_file),
                }},
            }],
        }],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))


async def wait_alertmanager_ready(url: str, proc: subprocess.Popen[bytes],
                                  log_path: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + DELIVERY_SECONDS
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(
                    f"{url}/-/ready", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                msg = f"Alertmanager not ready:\n{log_path.read_text()[-3000:]}"
                raise AssertionError(msg)
            await asyncio.sleep(0.05)


@pytest.fixture
async def alertmanager(
    ems_sim: RunningSim, tmp_path: Path
) -> AsyncIterator[RealAlertmanager]:
    """The real daemon, and a real Alertmanager whose webhook receiver is it."""
    require_alertmanager()
    config_path = tmp_path / "killswitch.yaml"
    doc = write_config(config_path, ems_sim.base_url, ACCOUNTS)
    daemon = DaemonProcess(config_path).start()
    token_file = tmp_path / "am-token"
    token_file.write_text(SECRETS["TEST_TRIP_TOKEN"] + "\n")
    am_config = tmp_path / "alertmanager.yml"
    write_alertmanager_config(am_config, doc["api"]["listen"], token_file)
    am_port = free_port()
    url = f"http://127.0.0.1:{am_port}"
    log_path = tmp_path / "alertmanager.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={am_config}",
             f"--storage.path={tmp_path / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{am_port}",
             "--cluster.listen-address=", "--log.level=debug"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await daemon.wait_ready()
        await wait_alertmanager_ready(url, proc, log_path)
        yield RealAlertmanager(url, daemon, proc, log_path)
    finally:
        stop_process(proc)
        daemon.stop()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """End a process this test started, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def cancelled(ems_sim: RunningSim) -> list[str]:
    return [r.exchange_id for r in ems_sim.sim.requests
            if r.path == CANCEL and r.exchange_id is not None]  # fmt: skip


def rfc3339(offset_seconds: float) -> str:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def latched(source: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(
        e.get("event") == "trip_latched" and e.get("source") == source for e in events
    )


async def test_alertmanager_critical_alert_trips_the_daemon(
    ems_sim: RunningSim, alertmanager: RealAlertmanager
) -> None:
    """A severity=critical alert fired in Alertmanager trips every account."""
    await alertmanager.fire("alertname=DeskLoss", "severity=critical")
    [trip] = await alertmanager.daemon.wait_for_event(
        "trip_latched", source="alertmanager", timeout_seconds=DELIVERY_SECONDS
    )
    assert sorted(trip["accounts"]) == sorted(ACCOUNTS)
    assert trip["reason"] == "alertmanager alert firing: DeskLoss"
    assert trip["actor"] == "risk"  # the trip token's name
    await ems_sim.sim.wait_for_requests(
        lambda _: sorted(cancelled(ems_sim)) == sorted(ACCOUNTS), DELIVERY_SECONDS
    )
    status = await alertmanager.status()
    assert status["state"] == "tripped"
    assert status["last_trip"]["source"] == "alertmanager"
    assert SECRETS["TEST_TRIP_TOKEN"] not in alertmanager.daemon.output()


async def test_alertmanager_warning_alert_does_not_trip(
    ems_sim: RunningSim, alertmanager: RealAlertmanager
) -> None:
    """A severity=warning alert is delivered (200) but trips nothing."""
    await alertmanager.fire("alertname=DiskFilling", "severity=warning")
    await alertmanager.wait_deliveries(1)
    status = await alertmanager.status()
    assert (status["state"], status["tripped_accounts"]) == ("armed", [])
    assert cancelled(ems_sim) == []
    assert not latched("alertmanager")(alertmanager.daemon.events())


async def test_alertmanager_resolved_alert_does_not_reset(
    ems_sim: RunningSim, alertmanager: RealAlertmanager
) -> None:
    """Resolving the alert sends a resolved notification; the daemon stays tripped."""
    start = rfc3339(-60)
    await alertmanager.fire("alertname=DeskLoss", "severity=critical", start=start)
    await alertmanager.daemon.wait_for(latched("alertmanager"), DELIVERY_SECONDS)
    await alertmanager.wait_deliveries(1)
    await alertmanager.fire(
        "alertname=DeskLoss", "severity=critical", start=start, end=rfc3339(-1)
    )
    await alertmanager.wait_deliveries(2)  # the resolved notification
    status = await alertmanager.status()
    assert status["state"] == "tripped"
    assert sorted(status["tripped_accounts"]) == sorted(ACCOUNTS)
    trips = [e for e in alertmanager.daemon.events()
             if e.get("event") == "trip_latched"]  # fmt: skip
    assert len(trips) == 1


async def test_alertmanager_accounts_label_scopes_the_trip(
    ems_sim: RunningSim, alertmanager: RealAlertmanager
) -> None:
    """killswitch_accounts="COINBASE" on the alert trips COINBASE alone."""
    await alertmanager.fire(
        "alertname=CoinbaseDesk", "severity=critical", "killswitch_accounts=COINBASE"
    )
    [trip] = await alertmanager.daemon.wait_for_event(
        "trip_latched", source="alertmanager", timeout_seconds=DELIVERY_SECONDS
    )
    assert trip["accounts"] == ["COINBASE"]
    await alertmanager.daemon.wait_for_event("fanout_finished", source="alertmanager")
    assert cancelled(ems_sim) == ["COINBASE"]
    status = await alertmanager.status()
    assert status["tripped_accounts"] == ["COINBASE"]


def test_alertmanager_config_for_the_tests_passes_amtool(tmp_path: Path) -> None:
    """The receiver config these tests use is one amtool accepts."""
    require_alertmanager()
    token_file = tmp_path / "token"
    token_file.write_text("x")
    config = tmp_path / "alertmanager.yml"
    write_alertmanager_config(config, "127.0.0.1:9470", token_file)
    result = subprocess.run(
        [AMTOOL, "check-config", str(config)], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
