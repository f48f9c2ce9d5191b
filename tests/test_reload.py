"""SIGHUP reloads of the real daemon, and the halt file trading systems check."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ACCOUNTS, RunningSim
from tests.processes import SECRETS, DaemonProcess, write_config

CANCEL = "/v1/orders/cancel/all"
TRIP = SECRETS["TEST_TRIP_TOKEN"]
ONCALL = SECRETS["TEST_ONCALL_TOKEN"]
NEW_TOKEN = "e2e-new-token-after-reload-3c9a"  # a test token
WAIT_SECONDS = 10.0


async def poll(
    predicate: Callable[[], bool], what: str, timeout_seconds: float = WAIT_SECONDS
) -> None:
    """Wait (bounded) until `predicate()` holds."""
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"{what}: not within {timeout_seconds}s"
            raise AssertionError(msg)
        await asyncio.sleep(0.02)


def audit_records(daemon: DaemonProcess) -> list[dict[str, Any]]:
    path = daemon.config_path.parent / "state" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def audited(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    """Wait until the audit log holds an `event` record; return all of them."""
    await poll(
        lambda: any(r["event"] == event for r in audit_records(daemon)),
        f"audit record {event}",
    )
    return [r for r in audit_records(daemon) if r["event"] == event]


def edit_config(
    daemon: DaemonProcess, change: Callable[[dict[str, Any]], None]
) -> None:
    """Rewrite the daemon's config file in place (same listen address)."""
    doc = yaml.safe_load(daemon.config_path.read_text())
    change(doc)
    daemon.config_path.write_text(yaml.safe_dump(doc))


async def status(daemon: DaemonProcess, token: str = ONCALL) -> dict[str, Any]:
    code, body = await daemon.request("GET", "/v1/status", token=token)
    assert code == 200, body
    return dict(body)


async def trip(
    daemon: DaemonProcess, accounts: list[str] | None = None, token: str = TRIP
) -> dict[str, Any]:
    body: dict[str, Any] = {"reason": "reload test"}
    if accounts is not None:
        body["accounts"] = accounts
    code, reply = await daemon.request("POST", "/v1/trip", token=token, json_body=body)
    assert code == 202, reply
    return dict(reply)


def cancelled(ems_sim: RunningSim) -> list[str]:
    return [r.exchange_id for r in ems_sim.sim.requests
            if r.path == CANCEL and r.exchange_id is not None]  # fmt: skip


# --- SIGHUP ------------------------------------------------------------------


async def test_reload_applies_new_tokens_and_accounts_and_keeps_the_latch(
    ems_sim: RunningSim, daemon: DaemonProcess, tmp_path: Path
) -> None:
    """A valid new config applies at once; accounts tripped before stay tripped."""
    await trip(daemon, ["COINBASE"])
    await daemon.wait_for_event("fanout_finished")
    token_file = tmp_path / "new.token"
    token_file.write_text(NEW_TOKEN + "\n")

    def change(doc: dict[str, Any]) -> None:
        doc["accounts"] = [*ACCOUNTS, "OKX"]
        doc["api"]["tokens"] = [
            {"name": "oncall", "token_env": "TEST_ONCALL_TOKEN",
             "permissions": ["trip", "reset", "status"]},
            {"name": "newbie", "token_file": str(token_file),
             "permissions": ["trip", "status"]},
        ]  # fmt: skip

    edit_config(daemon, change)
    daemon.send(signal.SIGHUP)
    [reloaded] = await daemon.wait_for_event("config_reloaded")
    assert reloaded["accounts"] == len(ACCOUNTS) + 1

    after = await status(daemon, NEW_TOKEN)
    assert after["tripped_accounts"] == ["COINBASE"]  # the latch is untouched
    assert after["accounts"]["OKX"]["tripped"] is False
    code, _ = await daemon.request("POST", "/v1/trip", token=TRIP, json_body={})
    assert code == 401  # the removed token no longer works

    ems_sim.sim.reset()
    reply = await trip(daemon, token=NEW_TOKEN)
    assert sorted(reply["accounts"]) == sorted([*ACCOUNTS, "OKX"])
    await ems_sim.sim.wait_for_requests(
        lambda _: "OKX" in cancelled(ems_sim), WAIT_SECONDS
    )
    [record] = await audited(daemon, "reload")
    assert record["accounts"] == len(ACCOUNTS) + 1
    assert NEW_TOKEN not in daemon.output()
    assert NEW_TOKEN not in json.dumps(audit_records(daemon))


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (
            lambda p: write_config(p, "http://127.0.0.1:1", ACCOUNTS,
                                   retry={"max_attempts": 0}),
            "retry.max_attempts: must be >= 1",
        ),
        (lambda p: p.write_text("accounts: [BINANCE\n"), "invalid YAML"),
        (
            lambda p: p.write_text(p.read_text() + "\nmystery_key: 1\n"),
            "mystery_key: unknown key",
        ),
    ],
    ids=["bad-value", "bad-yaml", "unknown-key"],
)  # fmt: skip
async def test_reload_invalid_file_keeps_the_old_config(
    ems_sim: RunningSim,
    daemon: DaemonProcess,
    write: Callable[[Path], Any],
    problem: str,
) -> None:
    """An invalid file is refused with the reason; the old config and latch remain."""
    await trip(daemon, ["BINANCE"])
    await daemon.wait_for_event("fanout_finished")
    original = daemon.config_path.read_text()
    write(daemon.config_path)
    daemon.send(signal.SIGHUP)
    [failed] = await daemon.wait_for_event("reload_failed")
    assert failed["level"] == "error"
    assert any(problem in p for p in failed["problems"]), failed["problems"]
    assert not [e for e in daemon.events() if e.get("event") == "config_reloaded"]
    [record] = await audited(daemon, "reload_failed")
    assert any(problem in p for p in record["problems"])

    after = await status(daemon)
    assert after["tripped_accounts"] == ["BINANCE"]
    assert sorted(after["accounts"]) == sorted(ACCOUNTS)
    ems_sim.sim.reset()
    await trip(daemon, ["KRAKEN/JOHN"])  # the old tokens and accounts still work
    await daemon.wait_for_event("fanout_finished", count=2)
    assert cancelled(ems_sim) == ["KRAKEN/JOHN"]

    daemon.config_path.write_text(original)  # fixing the file and reloading works
    daemon.send(signal.SIGHUP)
    await daemon.wait_for_event("config_reloaded")


async def test_reload_never_resets_tripped_accounts(
    ems_sim: RunningSim, daemon: DaemonProcess
) -> None:
    """Even a reload that drops a tripped account from the file leaves it latched."""
    await trip(daemon)
    await daemon.wait_for_event("fanout_finished")
    edit_config(daemon, lambda doc: doc.update(accounts=["BINANCE"]))
    daemon.send(signal.SIGHUP)
    await daemon.wait_for_event("config_reloaded")
    after = await status(daemon)
    assert sorted(after["tripped_accounts"]) == sorted(ACCOUNTS)
    assert after["state"] == "tripped"


# --- the halt file -------------------------------------------------------------


def halt_contents(path: Path) -> dict[str, Any] | None:
    """The halt file's JSON, or None when it does not exist (never half-written)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return dict(json.loads(raw))  # atomic rename: always whole JSON


async def test_halt_file_exists_while_any_account_is_tripped(
    daemon: DaemonProcess,
) -> None:
    """Created world-readable on a trip; gone only when every account is reset."""
    halt = daemon.config_path.parent / "halted"
    assert halt_contents(halt) is None
    await trip(daemon, ["BINANCE", "COINBASE"])
    await poll(lambda: halt_contents(halt) is not None, "halt file created")
    assert halt_contents(halt) == {"tripped": ["BINANCE", "COINBASE"]}
    mode = stat.S_IMODE(halt.stat().st_mode)
    assert mode & 0o444 == 0o444  # trading systems under other users read it
    assert mode & 0o022 == 0  # and nobody else may write it
    assert sorted(p.name for p in halt.parent.iterdir() if "halted" in p.name) == [
        "halted"
    ]  # no temporary file left behind
    assert (await status(daemon))["halt_file"] == str(halt)

    code, reply = await daemon.request(
        "POST", "/v1/reset", token=ONCALL,
        json_body={"reason": "binance checked", "accounts": ["BINANCE"]},
    )  # fmt: skip
    assert (code, reply["state"]) == (200, "tripped")
    await poll(
        lambda: halt_contents(halt) == {"tripped": ["COINBASE"]},
        "halt file rewritten",
    )
    code, reply = await daemon.request(
        "POST", "/v1/reset", token=ONCALL,
        json_body={"reason": "coinbase checked", "accounts": ["COINBASE"]},
    )  # fmt: skip
    assert (code, reply["state"]) == (200, "armed")
    await poll(lambda: halt_contents(halt) is None, "halt file removed")
    assert [r["accounts"] for r in await audited(daemon, "reset")][:1] == [["BINANCE"]]


async def test_halt_file_survives_a_reload(daemon: DaemonProcess) -> None:
    """A reload neither removes nor rewrites away the halt file of a tripped account."""
    halt = daemon.config_path.parent / "halted"
    await trip(daemon, ["KRAKEN/JOHN"])
    await poll(lambda: halt_contents(halt) is not None, "halt file created")
    daemon.send(signal.SIGHUP)
    await daemon.wait_for_event("config_reloaded")
    await trip(daemon, ["BINANCE"])
    await poll(
        lambda: halt_contents(halt) == {"tripped": ["BINANCE", "KRAKEN/JOHN"]},
        "halt file lists both",
    )
