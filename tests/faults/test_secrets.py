"""No secret (API key, token, HMAC secret) shows in any output, file or reply."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml

from killswitch.config import LogConfig
from killswitch.logging import configure_logging
from killswitch.sim import Simulator, running_simulator
from tests.conftest import ACCOUNTS
from tests.faults.conftest import Daemons
from tests.processes import DaemonProcess, free_port

API_KEY = "SEKRET-apikey-3b1e9f04c2d7"
TRIP = "SEKRET-trip-8d2c61aa5e0f"
ONCALL = "SEKRET-oncall-5f7e0b93c1d4"
VIEWER = "SEKRET-status-19c4d2e7a8b6"
HMAC_SECRET = "SEKRET-hmac-a06b3c58f2e1"
SECRETS = (API_KEY, TRIP, ONCALL, VIEWER, HMAC_SECRET)
ENV = {"KS_SECRET_API_KEY": API_KEY, "KS_SECRET_ONCALL": ONCALL}
FIRING = {
    "version": "1",
    "status": "firing",
    "alerts": [{"status": "firing", "labels": {"alertname": "Drawdown"}}],
}


def _secret_config(tmp_path: Path, base_url: str) -> dict[str, Any]:
    """Every kind of secret source: env, file, and an EMS that needs a key."""
    (tmp_path / "trip.token").write_text(TRIP + "\n")
    (tmp_path / "viewer.token").write_text(VIEWER + "\n")
    (tmp_path / "grafana.hmac").write_text(HMAC_SECRET + "\n")
    return {
        "ems": {
            "default": {
                "base_url": base_url,
                "api_key_env": "KS_SECRET_API_KEY",
                "timeout_seconds": 0.5,
            }
        },
        "sweep": {
            "deadline_seconds": 2.0,
            "verify": True,
            "verify_attempts": 2,
            "resweep_interval_seconds": 0,
        },
        "api": {
            "listen": f"127.0.0.1:{free_port()}",
            "max_body_bytes": 4096,
            "tokens": [
                {
                    "name": "risk",
                    "token_file": str(tmp_path / "trip.token"),
                    "permissions": ["trip"],
                },
                {
                    "name": "oncall",
                    "token_env": "KS_SECRET_ONCALL",
                    "permissions": ["trip", "reset", "status"],
                },
                {
                    "name": "viewer",
                    "token_file": str(tmp_path / "viewer.token"),
                    "permissions": ["status"],
                },
            ],
        },
        "triggers": {
            "signal": True,
            "alertmanager": {"match": {}},
            "grafana": {
                "match": {},
                "hmac_secret_file": str(tmp_path / "grafana.hmac"),
            },
        },
    }


class Evidence:
    """Everything a secret could leak into, collected for one scan."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, label: str, text: Any) -> None:
        self.items.append((label, text if isinstance(text, str) else repr(text)))

    def leaks(self) -> list[tuple[str, str]]:
        return [
            (label, secret)
            for label, text in self.items
            for secret in SECRETS
            if secret in text
        ]


async def _cli(evidence: Evidence, *args: str) -> int:
    """Run `python -m killswitch ARGS` without blocking the loop the EMS runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "killswitch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **ENV},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    evidence.add(f"cli {' '.join(args)} stdout", out.decode(errors="replace"))
    evidence.add(f"cli {' '.join(args)} stderr", err.decode(errors="replace"))
    assert proc.returncode is not None
    return proc.returncode


async def _call(
    evidence: Evidence,
    daemon: DaemonProcess,
    method: str,
    path: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    sent.update(headers or {})
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            daemon.api + path,
            headers=sent,
            json=json_body,
            data=data,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp,
    ):
        body = await resp.text(errors="replace")
        evidence.add(f"{method} {path} -> {resp.status} headers", dict(resp.headers))
        evidence.add(f"{method} {path} -> {resp.status} body", body)
        return resp.status


def _signed(body: bytes, secret: str = HMAC_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Grafana-Alerting-Signature": digest, "Content-Type": "application/json"}


@pytest.mark.timeout(120)
async def test_secrets_never_appear_in_any_output_file_or_reply(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Trips of every outcome, resets, reloads, bad requests, CLI: no secret leaks."""
    evidence = Evidence()
    sim = Simulator(ACCOUNTS, api_key=API_KEY, orders_per_account=3)
    async with running_simulator(sim) as base_url:
        overrides = _secret_config(tmp_path, base_url)
        config = daemons.write(base_url, ACCOUNTS, **overrides)
        assert await _cli(evidence, "check-config", "-c", str(config)) == 0
        daemon = daemons.start(config, env=ENV)
        await daemon.wait_ready()

        # Trips with every outcome: auth error, bad request, retryable, OTHER, ok.
        sim.fail_next("BINANCE", 1, status=401, reject_reason=None)
        sim.fail_next("KRAKEN/JOHN", 1, status=400, reject_reason=None)
        sim.fail_next("COINBASE", 10, status=490)
        sim.fail_next("BITSTAMP/2574", 2, status=200, reject_reason="OTHER")
        assert await _call(evidence, daemon, "POST", "/v1/trip", token=TRIP) == 202
        await daemon.wait_for_event("fanout_finished", source="webhook")
        sim.set_fault("BINANCE", hang=True)
        sim.set_fault("KRAKEN/JOHN", drop=True)
        sim.set_fault("COINBASE", garbage_body=True)
        daemon.send(signal.SIGUSR1)
        await daemon.wait_for_event("fanout_finished", source="signal")
        for account in ACCOUNTS:
            sim.set_fault(account)

        # Bad and refused requests of every kind.
        near_misses = [
            TRIP[:-1],
            TRIP + "x",
            TRIP.upper(),
            ONCALL[:-1],
            f"{TRIP} {ONCALL}",
        ]
        for token in near_misses:
            assert await _call(evidence, daemon, "POST", "/v1/trip", token=token) == 401
        assert await _call(evidence, daemon, "POST", "/v1/trip") == 401
        assert (
            await _call(
                evidence, daemon, "POST", "/v1/trip",
                headers={"Authorization": f"Basic {TRIP}"},
            )
            == 401
        )  # fmt: skip
        assert (
            await _call(
                evidence, daemon, "POST", "/v1/reset", token=TRIP,
                json_body={"reason": "no"},
            )
            == 403
        )  # fmt: skip
        assert await _call(evidence, daemon, "GET", "/v1/status", token=TRIP) == 403
        assert (
            await _call(
                evidence, daemon, "POST", "/v1/reset", token=ONCALL,
                data=b"{not json", headers={"Content-Type": "application/json"},
            )
            == 400
        )  # fmt: skip
        assert (
            await _call(
                evidence, daemon, "POST", "/v1/reset", token=ONCALL,
                data=b"x" * 10_000,
            )
            == 413
        )  # fmt: skip
        body = json.dumps(FIRING).encode()
        bad = _signed(body, secret=HMAC_SECRET[:-1])
        assert (
            await _call(evidence, daemon, "POST", "/v1/grafana", data=body, headers=bad)
            == 401
        )
        assert (
            await _call(
                evidence, daemon, "POST", "/v1/grafana", data=body,
                headers=_signed(body),
            )
            == 200
        )  # fmt: skip
        assert await _call(evidence, daemon, "GET", "/v1/nothing", token=ONCALL) == 404
        assert await _call(evidence, daemon, "DELETE", "/v1/trip", token=TRIP) == 405
        assert await _call(evidence, daemon, "GET", "/metrics") == 200
        assert await _call(evidence, daemon, "GET", "/readyz") in (200, 503)
        assert await _call(evidence, daemon, "GET", "/v1/status", token=VIEWER) == 200

        # The CLI: status (both forms), trip, reset, and a sweep without the daemon.
        assert await _cli(evidence, "status", "-c", str(config), "--json") == 0
        assert await _cli(evidence, "status", "-c", str(config)) == 0
        assert await _cli(evidence, "trip", "-c", str(config), "--reason", "cli") == 0
        assert await _cli(evidence, "reset", "-c", str(config), "--reason", "cli") == 0
        sim.fail_next("BINANCE", 1, status=401, reject_reason=None)
        assert await _cli(evidence, "sweep", "-c", str(config), "--reason", "x") == 1

        # Reloads: a good one, then one that breaks with a secret inline.
        daemon.send(signal.SIGHUP)
        await daemon.wait_for_event("config_reloaded")
        good = config.read_text()
        broken = yaml.safe_load(good)
        broken["ems"]["default"].pop("api_key_env")
        broken["ems"]["default"]["api_key"] = API_KEY
        broken["api"]["tokens"][1] = {
            "name": "oncall", "token": TRIP, "permissions": ["reset"],
        }  # fmt: skip
        config.write_text(yaml.safe_dump(broken) + f"oops: [{ONCALL}\n")
        daemon.send(signal.SIGHUP)
        await daemon.wait_for_event("reload_failed")
        assert await _cli(evidence, "check-config", "-c", str(config)) == 78
        config.write_text(yaml.safe_dump(broken))
        assert await _cli(evidence, "check-config", "-c", str(config)) == 78
        config.write_text(good)

        assert await _call(
            evidence, daemon, "POST", "/v1/reset", token=ONCALL,
            json_body={"reason": "done"},
        ) == 200  # fmt: skip
        await daemons.stop(daemon)

    state_dir = tmp_path / "state"
    evidence.add("daemon log", daemon.output())
    for path in [*sorted(state_dir.iterdir()), tmp_path / "halted"]:
        if path.is_file():
            evidence.add(str(path), path.read_text(errors="replace"))
    events = {e["event"] for e in daemon.events()}
    # The scan covered what it should: each outcome and failure was logged.
    assert {"reload_failed", "config_reloaded", "account_not_flat"} <= events
    outcomes = {e.get("outcome") for e in daemon.events()}
    assert {"auth_error", "rejected", "retryable_reject", "timeout"} <= outcomes
    assert {"network_error", "accepted"} <= outcomes
    assert not evidence.leaks(), evidence.leaks()


def _inline_doc(tmp_path: Path) -> dict[str, Any]:
    doc = _secret_config(tmp_path, "http://127.0.0.1:9")
    doc["accounts"] = list(ACCOUNTS)
    doc["ems"]["default"] = {"base_url": "http://127.0.0.1:9", "api_key": API_KEY}
    doc["api"]["tokens"][0] = {"name": "risk", "token": TRIP, "permissions": ["trip"]}
    doc["triggers"]["grafana"] = {"match": {}, "hmac_secret": HMAC_SECRET}
    doc["state_dir"] = str(tmp_path / "state")
    return doc


def _valid(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc)


def _yaml_error_on_the_secret_line(doc: dict[str, Any]) -> str:
    text = yaml.safe_dump(doc)
    return text.replace(f"api_key: {API_KEY}", f'api_key: "{API_KEY}\n  x: [')


def _same_secret_twice(doc: dict[str, Any]) -> str:
    doc["api"]["tokens"][2] = {
        "name": "viewer",
        "token": TRIP,
        "permissions": ["status"],
    }
    return yaml.safe_dump(doc)


def _secret_of_the_wrong_type(doc: dict[str, Any]) -> str:
    doc["api"]["tokens"][0]["token"] = [TRIP]
    doc["ems"]["default"]["api_key"] = {API_KEY: ONCALL}
    return yaml.safe_dump(doc)


def _secret_not_printable_ascii(doc: dict[str, Any]) -> str:
    doc["ems"]["default"]["api_key"] = API_KEY + "\u00e9"
    return yaml.safe_dump(doc)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (_valid, 0),
        (_yaml_error_on_the_secret_line, 78),
        (_same_secret_twice, 78),
        (_secret_of_the_wrong_type, 78),
        (_secret_not_printable_ascii, 78),
    ],
)
async def test_secrets_check_config_never_prints_inline_secrets(
    make: Any, code: int, tmp_path: Path
) -> None:
    """check-config on inline secrets, valid or broken: no message quotes them."""
    evidence = Evidence()
    config = tmp_path / "inline.yaml"
    config.write_text(make(_inline_doc(tmp_path)))
    assert await _cli(evidence, "check-config", "-c", str(config)) == code
    assert not evidence.leaks(), evidence.leaks()


def test_secrets_exception_logs_carry_no_local_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A logged exception never carries the values of the local variables it passed."""
    configure_logging(LogConfig(format="json", level="info"), cache=False)
    log = structlog.get_logger()

    def verify(secret: str) -> None:
        msg = "a bug while checking a signature"
        raise RuntimeError(msg)

    try:
        verify(HMAC_SECRET)
    except RuntimeError:
        log.exception("http_request_failed", endpoint="/v1/grafana")
    out = capsys.readouterr().out
    assert "http_request_failed" in out
    assert HMAC_SECRET not in out
