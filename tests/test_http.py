"""The HTTP API in-process: every endpoint and auth case, bad bodies, errors, metrics.

The app is the real one (create_app) over a real Switch, Fanout and EmsClient on
the EMS simulator, served on 127.0.0.1 by pytest-aiohttp's test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from killswitch.audit import AUDIT_FILE_NAME, AuditLog
from killswitch.config import (
    AlertmanagerConfig,
    Config,
    GrafanaConfig,
    LogConfig,
    TriggersConfig,
)
from killswitch.ems import EmsClient, create_session
from killswitch.fanout import Fanout
from killswitch.http import Readiness, create_app
from killswitch.latch import Latch
from killswitch.logging import configure_logging
from killswitch.metrics import Metrics
from killswitch.state import PersistedState, Persister
from killswitch.switch import Switch
from killswitch.triggers.webhook import BODY_READ_SECONDS
from tests.conftest import ACCOUNTS, RunningSim, make_config

CANCEL = "/v1/orders/cancel/all"
TRIP_TOKEN = "trip-token-abc"  # conftest's fake tokens
ONCALL_TOKEN = "oncall-token-xyz"
STATUS_TOKEN = "status-token-123"
WAIT_SECONDS = 5.0
POLL_SECONDS = 0.01


@dataclass
class Api:
    """The app under test, what it runs on, and a way to swap its config."""

    client: aiohttp.ClientSession  # its base_url is the API's
    host: str
    port: int
    sim: RunningSim
    switch: Switch
    registry: CollectorRegistry
    readiness: Readiness
    configs: list[Config]  # configs[-1] is what the app sees now
    write_errors: list[str]  # state, halt file and audit writes that failed

    @property
    def cfg(self) -> Config:
        return self.configs[-1]

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One request; returns (status, parsed JSON or text)."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
        resp = await self.client.request(method, path, headers=sent, data=data)
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def cancels(self, account: str | None = None) -> list[str]:
        return [
            r.exchange_id
            for r in self.sim.sim.requests
            if r.path == CANCEL
            and r.exchange_id is not None
            and (account is None or r.exchange_id == account)
        ]

    async def wait_cancelled(self, accounts: tuple[str, ...] = ACCOUNTS) -> None:
        """Wait (bounded) until every one of `accounts` got a cancel-all."""
        await self.sim.sim.wait_for_requests(
            lambda rs: set(accounts) <= {r.exchange_id for r in rs if r.path == CANCEL},
            WAIT_SECONDS,
        )

    async def wait_idle(self) -> None:
        """Wait (bounded) until no sweep is in flight."""
        await wait_until(lambda: not self.switch.fanout.in_flight)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


async def wait_until(
    predicate: Callable[[], bool], timeout_seconds: float = WAIT_SECONDS
) -> None:
    """Poll `predicate` until it holds; fail after `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout_seconds}s"
            raise AssertionError(msg)
        await asyncio.sleep(POLL_SECONDS)


def api_config(base_url: str, tmp_path: Path, **overrides: Any) -> Config:
    """conftest's config with both alert webhooks armed (Grafana without HMAC)."""
    fields: dict[str, Any] = {
        "triggers": TriggersConfig(
            signal=False,
            alertmanager=AlertmanagerConfig(match={"severity": "critical"}),
            grafana=GrafanaConfig(match={"severity": "critical"}),
        ),
    }
    fields.update(overrides)
    return make_config(base_url, tmp_path, **fields)


@contextlib.asynccontextmanager
async def serving_api(sim: RunningSim, cfg: Config) -> AsyncIterator[Api]:
    """The daemon's API and engine in this process, on the simulator."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.declare_accounts(cfg.account_ids)
    latch = Latch(cfg.account_ids)

    def snapshot() -> PersistedState:
        return PersistedState(
            tripped={a: r for a in latch.tripped_accounts if (r := latch.record(a))}
        )

    write_errors: list[str] = []

    def on_error(what: str, exc: Exception) -> None:
        write_errors.append(f"{what}: {exc}")

    configs = [cfg]
    readiness = Readiness()
    async with (
        AuditLog(cfg.state_dir / AUDIT_FILE_NAME, on_error) as audit,
        Persister(cfg.state_dir, cfg.halt_file, snapshot, on_error) as persister,
        create_session(len(cfg.accounts), 5.0) as session,
    ):
        ems = EmsClient(session, cfg.ems, cfg.accounts)
        async with Fanout(ems, cfg.retry, cfg.sweep, metrics) as fanout:
            switch = Switch(
                latch, fanout, metrics, audit, persister, cfg.account_ids,
                halt_file=str(cfg.halt_file) if cfg.halt_file else None,
            )  # fmt: skip
            async with switch:
                app = create_app(switch, metrics, lambda: configs[-1], readiness)
                # Configured like the daemon's runner (no handler cancellation).
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                try:
                    await web.TCPSite(runner, "127.0.0.1", 0).start()
                    host, port = runner.addresses[0][:2]
                    async with aiohttp.ClientSession(
                        base_url=f"http://{host}:{port}"
                    ) as client:
                        yield Api(
                            client, host, port, sim, switch, registry, readiness,
                            configs, write_errors,
                        )  # fmt: skip
                finally:
                    await runner.cleanup()


@pytest.fixture
async def api(ems_sim: RunningSim, tmp_path: Path) -> AsyncIterator[Api]:
    """The in-process API on the simulator."""
    cfg = api_config(ems_sim.base_url, tmp_path)
    async with serving_api(ems_sim, cfg) as served:
        yield served


FIRING = {
    "version": "4", "status": "firing", "receiver": "killswitch",
    "groupKey": '{}:{alertname="DeskLoss"}', "truncatedAlerts": 0,
    "groupLabels": {"alertname": "DeskLoss"},
    "commonLabels": {"alertname": "DeskLoss", "severity": "critical"},
    "commonAnnotations": {}, "externalURL": "http://am.example:9093",
    "alerts": [{
        "status": "firing",
        "labels": {"alertname": "DeskLoss", "severity": "critical"},
        "annotations": {}, "startsAt": "2026-01-01T00:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph",
        "fingerprint": "0123456789abcdef",
    }],
}  # fmt: skip

TRIPPING = {
    "/v1/trip": {"reason": "test"},
    "/v1/alertmanager": FIRING,
    "/v1/grafana": FIRING,
}
TRIPPING_STATUS = {"/v1/trip": 202, "/v1/alertmanager": 200, "/v1/grafana": 200}


# --- auth matrix -------------------------------------------------------------


@pytest.mark.parametrize("path", list(TRIPPING))
@pytest.mark.parametrize(
    ("token", "status"),
    [
        (None, 401),
        ("not-a-token", 401),
        (STATUS_TOKEN, 403),  # a real token without `trip`
    ],
)
async def test_trip_endpoints_refuse_without_trip_permission(
    api: Api, path: str, token: str | None, status: int
) -> None:
    """No or unknown token is 401, a token without `trip` is 403; nothing trips."""
    code, body = await api.call("POST", path, token=token, body=TRIPPING[path])
    assert code == status
    assert body["error"] == ("unauthorized" if status == 401 else "forbidden")
    assert body["detail"]
    assert not api.switch.latch.is_any_tripped
    assert api.cancels() == []


@pytest.mark.parametrize("path", list(TRIPPING))
@pytest.mark.parametrize("token", [TRIP_TOKEN, ONCALL_TOKEN])
async def test_trip_endpoints_trip_every_account_with_trip_permission(
    api: Api, path: str, token: str
) -> None:
    """A token holding `trip` trips: every account latched and cancelled."""
    code, body = await api.call("POST", path, token=token, body=TRIPPING[path])
    assert code == TRIPPING_STATUS[path]
    assert sorted(body["accounts"]) == sorted(ACCOUNTS)
    assert body["state"] == "tripped"
    assert body["trip_id"]
    assert api.switch.latch.tripped_accounts == ACCOUNTS
    await api.wait_cancelled()
    assert sorted(api.cancels()) == sorted(ACCOUNTS)


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("not-a-token", 401), (TRIP_TOKEN, 403), (STATUS_TOKEN, 403)],
)
async def test_reset_refuses_without_reset_permission(
    api: Api, token: str | None, status: int
) -> None:
    """Trip tokens (and status tokens) cannot reset: 403; the latch stays tripped."""
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    code, body = await api.call(
        "POST", "/v1/reset", token=token, body={"reason": "all clear"}
    )
    assert code == status
    assert set(body) == {"error", "detail"}
    assert api.switch.latch.tripped_accounts == ACCOUNTS


async def test_reset_rearms_with_reset_permission(api: Api) -> None:
    """The oncall token resets every account; the reply lists them and says armed."""
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    await api.wait_idle()
    code, body = await api.call(
        "POST", "/v1/reset", token=ONCALL_TOKEN, body={"reason": "all clear"}
    )
    assert code == 200
    assert sorted(body["reset"]) == sorted(ACCOUNTS)
    assert (body["state"], body["still_sweeping"]) == ("armed", [])
    assert not api.switch.latch.is_any_tripped


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("not-a-token", 401), (TRIP_TOKEN, 403)],
)
async def test_status_refuses_without_status_permission(
    api: Api, token: str | None, status: int
) -> None:
    """Status needs the `status` permission; a trip-only token is 403."""
    code, body = await api.call("GET", "/v1/status", token=token)
    assert code == status
    assert set(body) == {"error", "detail"}


@pytest.mark.parametrize("token", [STATUS_TOKEN, ONCALL_TOKEN])
async def test_status_reports_every_account_with_status_permission(
    api: Api, token: str
) -> None:
    """Status shows each account, the last trip, the version and the halt file."""
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN, body={"reason": "why"})
    await api.wait_idle()
    code, body = await api.call("GET", "/v1/status", token=token)
    assert code == 200
    assert body["state"] == "tripped"
    assert sorted(body["accounts"]) == sorted(ACCOUNTS)
    binance = body["accounts"]["BINANCE"]
    assert (binance["tripped"], binance["last_outcome"], binance["flat"]) == (
        True, "accepted", True,
    )  # fmt: skip
    assert (binance["attempts"], binance["open_orders"]) == (1, 0)
    assert body["last_trip"]["source"] == "webhook"
    assert body["last_trip"]["reason"] == "why"
    assert body["version"]
    assert body["halt_file"] == str(api.cfg.halt_file)


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
@pytest.mark.parametrize("token", [None, "not-a-token", TRIP_TOKEN, ONCALL_TOKEN])
async def test_open_endpoints_answer_any_caller(
    api: Api, path: str, token: str | None
) -> None:
    """/metrics, /healthz and /readyz need no token, and ignore a wrong one."""
    api.readiness.listening = True
    api.readiness.ems_warm["default"] = True
    code, _ = await api.call("GET", path, token=token)
    assert code == 200
    assert api.cancels() == []


async def test_readyz_is_503_until_listening_and_warm(api: Api) -> None:
    """/readyz says 503 (and why) until the listener is up and every EMS is warm."""
    code, body = await api.call("GET", "/readyz")
    assert (code, body["ready"]) == (503, False)
    api.readiness.listening = True
    api.readiness.ems_warm["default"] = False
    code, body = await api.call("GET", "/readyz")
    assert (code, body["ems_warm"]) == (503, {"default": False})
    api.readiness.ems_warm["default"] = True
    code, body = await api.call("GET", "/readyz")
    assert (code, body["ready"]) == (200, True)


async def test_metrics_serves_prometheus_exposition(api: Api) -> None:
    """/metrics is the text exposition with the killswitch_* series."""
    resp = await api.client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert 'killswitch_tripped{account="BINANCE"} 0.0' in text
    assert "killswitch_build_info" in text


@pytest.mark.parametrize(
    "header",
    ["Basic dHJpcDp0b2tlbg==", "Bearer", "Bearer ", "trip-token-abc", "bearer\ttoken"],
)
async def test_trip_malformed_authorization_is_401(api: Api, header: str) -> None:
    """Anything but `Bearer <known token>` is 401 and trips nothing."""
    code, body = await api.call(
        "POST", "/v1/trip", headers={"Authorization": header}, body={}
    )
    assert (code, body["error"]) == (401, "unauthorized")
    assert not api.switch.latch.is_any_tripped


async def raw_request(api: Api, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (headers that are not UTF-8); return the status line."""
    host, port = api.host, api.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        async with asyncio.timeout(WAIT_SECONDS):
            return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_trip_non_utf8_token_is_401_not_500(api: Api) -> None:
    """A token with bytes that are not UTF-8 is an unknown token, not a crash."""
    status = await raw_request(
        api,
        b"POST /v1/trip HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\xa9",
        b"{}",
    )
    assert status.startswith(b"HTTP/1.1 401"), status
    assert not api.switch.latch.is_any_tripped


# --- /v1/trip bodies ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "note"),
    [
        (b"", "no body"),
        (b"   \n", "no body"),
        (b"trip now!", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b'{"reason": "x", "accounts": ["BINANCE"', "not JSON"),
        (b"[" * 60_000, "not JSON"),  # nested deeper than the JSON parser recurses
        (b'["BINANCE"]', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'"BINANCE"', "not a JSON object"),
        (b'{"accounts": "BINANCE"}', "'accounts' is not a list of strings"),
        (b'{"accounts": [1, 2]}', "'accounts' is not a list of strings"),
        (b'{"accounts": {"BINANCE": true}}', "'accounts' is not a list of strings"),
        (b'{"accounts": ["BINANCE", null]}', "'accounts' is not a list of strings"),
        (b'{"accounts": ["BINANCE", "NOPE"]}', "unknown accounts ['NOPE']"),
        (b'{"accounts": ["binance"]}', "unknown accounts ['binance']"),
        (b'{"accounts": []}', "no accounts named"),
        (b'{"account": ["BINANCE"]}', "unknown keys ignored: ['account']"),
        (b'{"reason": 42}', "'reason' is not a non-empty string"),
        (b'{"reason": ""}', "'reason' is not a non-empty string"),
    ],
)
async def test_trip_bad_body_still_trips_every_account(
    api: Api, data: bytes, note: str
) -> None:
    """An authenticated trip with a missing or broken body trips all, and says why."""
    code, body = await api.call("POST", "/v1/trip", token=TRIP_TOKEN, data=data)
    assert code == 202
    assert sorted(body["accounts"]) == sorted(ACCOUNTS)
    assert any(note in n for n in body["notes"]), body["notes"]
    assert api.switch.latch.tripped_accounts == ACCOUNTS
    await api.wait_cancelled()


async def test_trip_valid_body_trips_only_the_named_accounts(api: Api) -> None:
    """A well-formed scoped request trips exactly the accounts it names."""
    code, body = await api.call(
        "POST", "/v1/trip", token=TRIP_TOKEN,
        body={"reason": "desk 2 limit", "accounts": ["KRAKEN/JOHN", "COINBASE"]},
    )  # fmt: skip
    assert code == 202
    assert body["accounts"] == ["KRAKEN/JOHN", "COINBASE"]
    assert body["notes"] == []
    await api.wait_cancelled(("KRAKEN/JOHN", "COINBASE"))
    await api.wait_idle()
    assert sorted(api.cancels()) == ["COINBASE", "KRAKEN/JOHN"]
    assert api.switch.latch.tripped_accounts == ("KRAKEN/JOHN", "COINBASE")
    assert api.switch.latch.last_trip is not None
    assert api.switch.latch.last_trip.reason == "desk 2 limit"


async def test_trip_oversize_body_is_413_and_still_trips_everything(api: Api) -> None:
    """A body over max_body_bytes is 413, and an authenticated one still trips all."""
    limit = api.cfg.api.max_body_bytes
    data = json.dumps({"reason": "x" * limit, "accounts": ["BINANCE"]}).encode()
    code, body = await api.call("POST", "/v1/trip", token=TRIP_TOKEN, data=data)
    assert code == 413
    assert body["error"] == "payload_too_large"
    assert str(limit) in body["detail"]
    assert sorted(body["accounts"]) == sorted(ACCOUNTS)
    await api.wait_cancelled()


async def test_trip_oversize_chunked_body_is_413(api: Api) -> None:
    """A chunked body (no Content-Length) is cut off at the limit too."""
    limit = api.cfg.api.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024

    resp = await api.client.post(
        "/v1/trip",
        headers={"Authorization": f"Bearer {TRIP_TOKEN}"},
        data=chunks(),
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"


async def test_trip_oversize_body_without_token_is_401(api: Api) -> None:
    """Auth comes first: an unauthenticated oversize body is 401 and trips nothing."""
    data = b" " * (api.cfg.api.max_body_bytes + 1)
    code, body = await api.call("POST", "/v1/trip", data=data)
    assert (code, body["error"]) == (401, "unauthorized")
    assert not api.switch.latch.is_any_tripped


async def test_trip_stalled_body_trips_everything_within_the_read_deadline(
    api: Api,
) -> None:
    """A trip whose body stops arriving (connection open) trips all, then 408."""
    reader, writer = await asyncio.open_connection(api.host, api.port)
    try:
        writer.write(
            b"POST /v1/trip HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Authorization: Bearer " + TRIP_TOKEN.encode() + b'\r\n\r\n{"rea'
        )
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(BODY_READ_SECONDS + WAIT_SECONDS):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 408"), status
        assert time.monotonic() - started < BODY_READ_SECONDS + 1.0
        assert api.switch.latch.tripped_accounts == ACCOUNTS
    finally:
        writer.close()
        await writer.wait_closed()
    await api.wait_cancelled()


async def test_trip_202_comes_after_the_trip_is_on_disk(api: Api) -> None:
    """When the 202 arrives, state.json already holds the trip (a crash keeps it)."""
    code, body = await api.call(
        "POST", "/v1/trip", token=TRIP_TOKEN, body={"accounts": ["BINANCE"]}
    )
    assert (code, body["persisted"]) == (202, True)
    state = json.loads((api.cfg.state_dir / "state.json").read_text())
    assert state["tripped"]["BINANCE"]["trip_id"] == body["trip_id"]


async def test_trip_unwritable_state_still_trips_and_says_not_persisted(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """A state write that fails never stops a trip; the reply says it is not durable."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = api_config(ems_sim.base_url, tmp_path, state_dir=blocker / "state")
    async with serving_api(ems_sim, cfg) as api:
        code, body = await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
        assert (code, body["persisted"]) == (202, False)
        assert any("not on disk" in n for n in body["notes"])
        assert api.write_errors
        await api.wait_cancelled()


async def test_trip_body_limit_follows_a_config_reload(api: Api) -> None:
    """max_body_bytes is read live: a reloaded smaller limit applies at once."""
    api.configs.append(replace(api.cfg, api=replace(api.cfg.api, max_body_bytes=64)))
    data = json.dumps({"reason": "r" * 100}).encode()
    code, body = await api.call("POST", "/v1/reset", token=ONCALL_TOKEN, data=data)
    assert (code, body["error"]) == (413, "payload_too_large")


async def test_trip_again_while_sweeping_coalesces(api: Api) -> None:
    """A trip during a running sweep is accepted, named coalesced, and swept after."""
    api.sim.sim.set_fault("BINANCE", delay_seconds=0.3)
    _, first = await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    await api.wait_cancelled(("BINANCE",))
    code, second = await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    assert code == 202
    assert "BINANCE" in second["coalesced"]
    assert second["trip_id"] != first["trip_id"]
    await wait_until(lambda: len(api.cancels("BINANCE")) == 2)
    await api.wait_idle()


# --- /v1/reset bodies --------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "JSON object"),
        (b"please reset", "JSON object"),
        (b"[1]", "JSON object"),
        (b"[" * 60_000, "JSON object"),
        (b"{}", "'reason'"),
        (b'{"reason": ""}', "'reason'"),
        (b'{"reason": "   "}', "'reason'"),
        (b'{"reason": 1}', "'reason'"),
        (b'{"reason": "ok", "accounts": "BINANCE"}', "'accounts'"),
        (b'{"reason": "ok", "accounts": [1]}', "'accounts'"),
        (b'{"reason": "ok", "accounts": []}', "'accounts'"),
        (b'{"reason": "ok", "accounts": ["NOPE"]}', "unknown accounts ['NOPE']"),
        (b'{"reason": "ok", "acounts": ["BINANCE"]}', "unknown keys ['acounts']"),
    ],
)
async def test_reset_bad_body_is_400_and_resets_nothing(
    api: Api, data: bytes, detail: str
) -> None:
    """A reset body that is not exactly {reason, accounts?} is 400; still tripped."""
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    code, body = await api.call("POST", "/v1/reset", token=ONCALL_TOKEN, data=data)
    assert code == 400
    assert body["error"] == "bad_request"
    assert detail in body["detail"]
    assert api.switch.latch.tripped_accounts == ACCOUNTS


async def test_reset_named_accounts_leaves_the_others_tripped(api: Api) -> None:
    """Resetting one account re-arms it alone; the state stays tripped."""
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    code, body = await api.call(
        "POST", "/v1/reset", token=ONCALL_TOKEN,
        body={"reason": "binance checked", "accounts": ["BINANCE"]},
    )  # fmt: skip
    assert code == 200
    assert (body["reset"], body["state"]) == (["BINANCE"], "tripped")
    assert api.switch.latch.tripped_accounts == ACCOUNTS[1:]


async def test_reset_during_a_sweep_says_still_sweeping_and_cancel_completes(
    api: Api,
) -> None:
    """A reset mid-sweep re-arms at once; the in-flight cancel still runs to its end."""
    api.sim.sim.set_fault("COINBASE", delay_seconds=0.4)
    await api.call(
        "POST", "/v1/trip", token=TRIP_TOKEN, body={"accounts": ["COINBASE"]}
    )
    await api.wait_cancelled(("COINBASE",))
    code, body = await api.call(
        "POST", "/v1/reset", token=ONCALL_TOKEN,
        body={"reason": "false alarm", "accounts": ["COINBASE"]},
    )  # fmt: skip
    assert code == 200
    assert body["still_sweeping"] == ["COINBASE"]
    assert body["reset"] == ["COINBASE"]
    assert body["state"] == "armed"
    assert any("never abandoned" in n for n in body["notes"])
    assert not api.switch.latch.is_any_tripped
    await api.wait_idle()
    result = api.switch.fanout.last_results["COINBASE"]
    assert (result.outcome, result.flat) == ("accepted", True)
    assert api.sim.sim.open_orders("COINBASE") == []
    assert not api.switch.latch.is_any_tripped


# --- errors and counting -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/v1/nope", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/trip", 405, "method_not_allowed"),
        ("PUT", "/v1/reset", 405, "method_not_allowed"),
        ("POST", "/v1/status", 405, "method_not_allowed"),
        ("DELETE", "/metrics", 405, "method_not_allowed"),
    ],
)
async def test_errors_are_json_with_error_and_detail(
    api: Api, method: str, path: str, status: int, error: str
) -> None:
    """404 and 405 come back as {"error", "detail"} JSON like every other error."""
    resp = await api.client.request(method, path)
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    if status == 405:
        assert resp.headers["Allow"]


async def test_alert_endpoints_unconfigured_are_404(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """An absent triggers.alertmanager/grafana section disables that endpoint (404)."""
    cfg = api_config(ems_sim.base_url, tmp_path, triggers=TriggersConfig(signal=False))
    async with serving_api(ems_sim, cfg) as api:
        for path in ("/v1/alertmanager", "/v1/grafana"):
            code, body = await api.call("POST", path, token=TRIP_TOKEN, body=FIRING)
            assert (code, body["error"]) == (404, "not_found")
            code, _ = await api.call("POST", path, body=FIRING)
            assert code == 401
        assert not api.switch.latch.is_any_tripped


async def test_http_requests_are_counted_by_endpoint_and_code(api: Api) -> None:
    """killswitch_http_requests_total counts each request by route and status."""
    await api.call("POST", "/v1/trip")
    await api.call("POST", "/v1/trip", token=STATUS_TOKEN)
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    await api.call("POST", "/v1/trip", token=TRIP_TOKEN)
    await api.call("GET", "/v1/status", token=ONCALL_TOKEN)
    await api.call("GET", "/nowhere")
    await api.call("GET", "/v1/trip")
    total = "killswitch_http_requests_total"
    assert api.sample(total, {"endpoint": "/v1/trip", "code": "401"}) == 1
    assert api.sample(total, {"endpoint": "/v1/trip", "code": "403"}) == 1
    assert api.sample(total, {"endpoint": "/v1/trip", "code": "202"}) == 2
    assert api.sample(total, {"endpoint": "/v1/status", "code": "200"}) == 1
    assert api.sample(total, {"endpoint": "other", "code": "404"}) == 1
    assert api.sample(total, {"endpoint": "other", "code": "405"}) == 1
    assert api.sample("killswitch_trips_total", {"source": "webhook"}) == 2


async def test_secrets_never_appear_in_responses(api: Api) -> None:
    """No token or API key is echoed in any reply, error or status."""
    replies = [
        await api.call("POST", "/v1/trip", token="wrong-" + TRIP_TOKEN),
        await api.call("POST", "/v1/reset", token=TRIP_TOKEN, body={"reason": "x"}),
        await api.call("POST", "/v1/trip", token=TRIP_TOKEN, data=b"junk"),
        await api.call("GET", "/v1/status", token=ONCALL_TOKEN),
    ]
    resp = await api.client.get("/metrics")
    text = json.dumps(replies) + await resp.text()
    for secret in (TRIP_TOKEN, ONCALL_TOKEN, STATUS_TOKEN, "sim-key-0123456789abcdef"):
        assert secret not in text


async def test_trip_cut_off_mid_body_trips_everything_and_server_keeps_serving(
    api: Api,
) -> None:
    """An authenticated trip whose client drops mid-body trips all; nothing crashes."""
    host, port = api.host, api.port
    with capture_logs() as logs:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /v1/trip HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Authorization: Bearer " + TRIP_TOKEN.encode() + b'\r\n\r\n{"rea'
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: api.switch.latch.tripped_accounts == ACCOUNTS)
        code, _ = await api.call("GET", "/healthz")
    assert code == 200
    assert "http_request_failed" not in [e["event"] for e in logs]
    await api.wait_cancelled()


async def test_handler_bug_is_a_json_500_logged_without_secrets(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler bug: JSON 500, counted, logged with a traceback but no locals."""
    configure_logging(LogConfig(format="json", level="info"), cache=False)

    def broken_status() -> dict[str, Any]:
        secret = ONCALL_TOKEN  # a local a traceback with locals would print
        msg = f"status is broken ({len(secret)})"
        raise RuntimeError(msg)

    monkeypatch.setattr(api.switch, "status", broken_status)
    code, body = await api.call("GET", "/v1/status", token=ONCALL_TOKEN)
    assert (code, body["error"]) == (500, "internal_error")
    code, _ = await api.call("GET", "/healthz")
    assert code == 200
    assert (
        api.sample(
            "killswitch_http_requests_total", {"endpoint": "/v1/status", "code": "500"}
        )
        == 1
    )
    out = capsys.readouterr().out
    [failed] = [
        json.loads(line) for line in out.splitlines() if "http_request_failed" in line
    ]
    assert failed["error"] == "RuntimeError"
    assert "broken_status" in failed["traceback"]
    assert ONCALL_TOKEN not in out
