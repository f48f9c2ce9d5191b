"""The `killswitch` command: exit codes via run(argv), and the real CLI as a process."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from killswitch.cli import ExitCode, run
from tests.conftest import ACCOUNTS, RunningSim
from tests.processes import SECRETS, DaemonProcess, free_port, write_config

CANCEL = "/v1/orders/cancel/all"
CLI_SECONDS = 30.0


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment variables the test configs read their secrets from."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def config_file(
    tmp_path: Path, name: str = "killswitch.yaml", **overrides: Any
) -> Path:
    """A config (the daemon's test config) pointing at an EMS on a closed port."""
    path = tmp_path / name
    write_config(path, f"http://127.0.0.1:{free_port()}", ACCOUNTS, **overrides)
    return path


def trip_only_api(listen: str) -> dict[str, Any]:
    """An api section whose one token can trip but not reset."""
    return {"listen": listen, "tokens": [
        {"name": "risk", "token_env": "TEST_TRIP_TOKEN", "permissions": ["trip"]},
    ]}  # fmt: skip


# --- exit codes in-process ---------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], ExitCode.OK),
        (["--version"], ExitCode.OK),
        (["trip", "--help"], ExitCode.OK),
        ([], ExitCode.USAGE),
        (["frobnicate"], ExitCode.USAGE),
        (["trip"], ExitCode.USAGE),  # --reason is required
        (["sweep", "--reason", "x"], ExitCode.USAGE),  # -c is required
        (["status", "--json", "--bogus"], ExitCode.USAGE),
    ],
)
def test_cli_argv_errors_exit_usage_and_help_exits_ok(
    argv: list[str], code: ExitCode, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help and --version exit 0; a command line argparse refuses exits 2."""
    assert run(argv) == code
    capsys.readouterr()


def test_cli_client_without_config_or_url_exits_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """trip/status/reset need -c, or --url with --token-file: exit 2 and say so."""
    assert run(["status"]) == ExitCode.USAGE
    assert (
        "give -c FILE, or --url URL with --token-file FILE" in capsys.readouterr().err
    )


def test_cli_url_without_token_file_exits_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--url alone has no token to send: exit 2 rather than a certain 401."""
    assert run(["status", "--url", "http://127.0.0.1:9"]) == ExitCode.USAGE
    assert "--url needs --token-file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_cli_unusable_token_file_exits_usage(
    tmp_path: Path, content: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token file that is missing or empty is a usage error naming the file."""
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    argv = ["status", "--url", "http://127.0.0.1:9", "--token-file", str(token_file)]
    assert run(argv) == ExitCode.USAGE
    assert str(token_file) in capsys.readouterr().err


@pytest.mark.usefixtures("secrets_env")
def test_cli_reset_without_a_reset_token_exits_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config whose only token lacks `reset`: a clear error, exit 2."""
    path = config_file(tmp_path, api=trip_only_api(f"127.0.0.1:{free_port()}"))
    assert run(["reset", "-c", str(path), "--reason", "x"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"{path}: no api.tokens entry has the 'reset' permission" in err
    assert SECRETS["TEST_TRIP_TOKEN"] not in err


@pytest.mark.usefixtures("secrets_env")
@pytest.mark.parametrize("command", ["trip", "reset", "status"])
def test_cli_daemon_unreachable_exits_failure(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at api.listen: exit 1; a trip points to `killswitch sweep`."""
    path = config_file(tmp_path)
    argv = [command, "-c", str(path)]
    if command != "status":
        argv += ["--reason", "desk on fire"]
    assert run(argv) == ExitCode.FAILURE
    err = capsys.readouterr().err
    assert "daemon unreachable at http://127.0.0.1:" in err
    if command == "trip":
        assert f'killswitch sweep -c {path} --reason "desk on fire"' in err


@pytest.mark.usefixtures("secrets_env")
def test_cli_check_config_prints_redacted_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config exits 0 and prints the effective config, every secret redacted."""
    path = config_file(tmp_path)
    assert run(["check-config", "-c", str(path)]) == ExitCode.OK
    out, err = capsys.readouterr()
    for secret in SECRETS.values():
        assert secret not in out + err
    doc = yaml.safe_load(out)
    assert doc["ems"]["default"]["api_key"] == "<redacted>"
    assert {t["token"] for t in doc["api"]["tokens"]} == {"<redacted>"}
    assert [a["id"] for a in doc["accounts"]] == list(ACCOUNTS)


def test_cli_check_config_warns_about_inline_secrets_without_printing_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An inline token is allowed but warned about; its value is never printed."""
    inline = "inline-token-d00d-0123456789"
    api = {"listen": "127.0.0.1:9470", "tokens": [
        {"name": "ops", "token": inline, "permissions": ["trip", "reset", "status"]},
    ]}  # fmt: skip
    path = config_file(
        tmp_path, api=api, ems={"default": {"base_url": "http://127.0.0.1:1"}}
    )
    assert run(["check-config", "-c", str(path)]) == ExitCode.OK
    out, err = capsys.readouterr()
    assert "api.tokens[0].token: inline secret" in err
    assert inline not in out + err


@pytest.mark.usefixtures("secrets_env")
@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts: must be >= 1"),
        (
            {"ems": {"default": {"base_url": "ftp://ems"}}},
            "ems.default.base_url: must be an http:// or https:// URL",
        ),
        ({"sweep": {"deadline_secs": 5}}, "sweep.deadline_secs: unknown key"),
        (
            {"api": {"listen": "127.0.0.1:9470", "tokenz": []}},
            "api.tokenz: unknown key",
        ),
    ],
)
def test_cli_check_config_bad_config_exits_78_naming_the_key(
    tmp_path: Path,
    overrides: dict[str, Any],
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad config exits 78 (EX_CONFIG) and names the key path of the problem."""
    path = config_file(tmp_path, **overrides)
    assert run(["check-config", "-c", str(path)]) == ExitCode.CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert f"config error in {path}" in err
    assert problem in err


@pytest.mark.parametrize("command", ["run", "sweep", "trip"])
def test_cli_missing_config_file_exits_78(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that cannot be read is a config error (78) for every command."""
    missing = tmp_path / "nope.yaml"
    argv = [command, "-c", str(missing)]
    if command != "run":
        argv += ["--reason", "x"]
    assert run(argv) == ExitCode.CONFIG
    assert f"{missing}: cannot read" in capsys.readouterr().err


# --- the real CLI against the real daemon ------------------------------------


async def killswitch(
    *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m killswitch ARGS` without blocking the loop serving the EMS."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "killswitch", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **SECRETS, **(env or {})},
    )  # fmt: skip
    async with asyncio.timeout(CLI_SECONDS):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cancelled(ems_sim: RunningSim) -> list[str]:
    return [r.exchange_id for r in ems_sim.sim.requests
            if r.path == CANCEL and r.exchange_id is not None]  # fmt: skip


async def test_cli_trip_status_reset_round_trip(
    ems_sim: RunningSim, daemon: DaemonProcess
) -> None:
    """trip, status (table and --json) and reset against a running daemon, with -c."""
    config = str(daemon.config_path)
    code, out, err = await killswitch(
        "trip", "-c", config, "--reason", "cli drill", "--account", "COINBASE"
    )
    assert code == 0, err
    assert out.startswith("tripped: trip_id=")
    assert "accounts=COINBASE" in out
    [latched] = await daemon.wait_for_event("trip_latched")
    assert (latched["actor"], latched["reason"]) == ("risk", "cli drill")
    await daemon.wait_for_event("fanout_finished")
    assert cancelled(ems_sim) == ["COINBASE"]

    code, out, err = await killswitch("status", "-c", config)
    assert code == 0, err
    assert "state: tripped" in out
    assert "cli drill" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line}
    assert rows["ACCOUNT"][:3] == ["ACCOUNT", "TRIPPED", "SWEEPING"]
    assert rows["COINBASE"][1:3] == ["yes", "accepted"]
    assert rows["BINANCE"][1:3] == ["no", "-"]
    assert f"halt file: {daemon.config_path.parent / 'halted'}" in out

    code, out, err = await killswitch("status", "-c", config, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["state"], doc["tripped_accounts"]) == ("tripped", ["COINBASE"])
    assert doc["accounts"]["COINBASE"]["flat"] is True

    code, out, err = await killswitch("reset", "-c", config, "--reason", "drill over")
    assert code == 0, err
    assert "state=armed" in out
    code, out, _ = await killswitch("status", "-c", config, "--json")
    assert json.loads(out)["state"] == "armed"
    for secret in SECRETS.values():
        assert secret not in daemon.output()


async def test_cli_trip_all_accounts_by_default(
    ems_sim: RunningSim, daemon: DaemonProcess
) -> None:
    """Without --account, a CLI trip covers every account."""
    code, out, err = await killswitch(
        "trip", "-c", str(daemon.config_path), "--reason", "everything"
    )
    assert code == 0, err
    assert f"accounts={','.join(ACCOUNTS)}" in out
    await daemon.wait_for_event("fanout_finished")
    assert sorted(cancelled(ems_sim)) == sorted(ACCOUNTS)


async def test_cli_url_and_token_file_replace_config(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """--url with --token-file works without -c; a trip token cannot reset (exit 1)."""
    trip_token = tmp_path / "trip.token"
    trip_token.write_text(SECRETS["TEST_TRIP_TOKEN"] + "\n")
    oncall_token = tmp_path / "oncall.token"
    oncall_token.write_text(SECRETS["TEST_ONCALL_TOKEN"] + "\n")
    url = ["--url", daemon.api]

    code, out, err = await killswitch(
        "trip", *url, "--token-file", str(trip_token), "--reason", "by url"
    )
    assert code == 0, err
    code, out, err = await killswitch(
        "status", *url, "--token-file", str(oncall_token), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["state"] == "tripped"

    code, out, err = await killswitch(
        "reset", *url, "--token-file", str(trip_token), "--reason", "nope"
    )
    assert code == 1
    assert "reset refused" in err
    assert "403" in err
    assert SECRETS["TEST_TRIP_TOKEN"] not in out + err

    code, _, err = await killswitch(
        "reset", *url, "--token-file", str(oncall_token), "--reason", "ok"
    )
    assert code == 0, err


async def test_cli_reset_with_trip_only_config_exits_usage(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The real CLI: a config whose only token lacks `reset` exits 2 with the reason."""
    doc = yaml.safe_load(daemon.config_path.read_text())
    path = tmp_path / "trip-only.yaml"
    doc["api"] = trip_only_api(doc["api"]["listen"])
    path.write_text(yaml.safe_dump(doc))
    code, _, err = await killswitch("reset", "-c", str(path), "--reason", "x")
    assert code == 2
    assert "no api.tokens entry has the 'reset' permission" in err
    code, _, err = await killswitch("trip", "-c", str(path), "--reason", "x")
    assert code == 0, err


async def test_cli_trip_unreachable_daemon_points_to_sweep(tmp_path: Path) -> None:
    """The real CLI: nothing listening -> exit 1, and the way out is printed."""
    path = config_file(tmp_path)
    code, _, err = await killswitch("trip", "-c", str(path), "--reason", "x")
    assert code == 1
    assert "daemon unreachable" in err
    assert f"killswitch sweep -c {path}" in err


async def test_cli_check_config_subprocess_redacts_and_exits_zero(
    tmp_path: Path,
) -> None:
    """The real `check-config`: exit 0, redacted YAML on stdout, no secret anywhere."""
    path = config_file(tmp_path)
    code, out, err = await killswitch("check-config", "-c", str(path))
    assert code == 0, err
    assert "<redacted>" in out
    for secret in SECRETS.values():
        assert secret not in out + err
    bad = config_file(tmp_path, "bad.yaml", retry={"max_attempts": 0})
    code, out, err = await killswitch("check-config", "-c", str(bad))
    assert code == 78
    assert "retry.max_attempts: must be >= 1" in err


# --- killswitch sweep (no daemon) ---------------------------------------------


def sweep_config(ems_sim: RunningSim, tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    write_config(
        path, ems_sim.base_url, ACCOUNTS,
        sweep={"deadline_seconds": 3.0, "verify": True, "verify_attempts": 2,
               "resweep_interval_seconds": 0},
        log={"format": "json", "level": "warning"},
    )  # fmt: skip
    return path


def sweep_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}


async def test_cli_sweep_all_flat_exits_zero(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """`killswitch sweep` cancels every account itself and exits 0 when all are flat."""
    path = sweep_config(ems_sim, tmp_path)
    code, out, err = await killswitch(
        "sweep", "-c", str(path), "--reason", "daemon down"
    )
    assert code == 0, err
    rows = sweep_rows(out)
    assert rows["ACCOUNT"] == [
        "ACCOUNT",
        "OUTCOME",
        "ATTEMPTS",
        "OPEN",
        "FLAT",
        "ERROR",
    ]
    for account in ACCOUNTS:
        assert rows[account][:5] == [account, "accepted", "1", "0", "yes"]
    assert f"{len(ACCOUNTS)} ok, 0 failed" in out
    assert sorted(cancelled(ems_sim)) == sorted(ACCOUNTS)
    for account in ACCOUNTS:
        assert ems_sim.sim.open_orders(account) == []


async def test_cli_sweep_named_account_only(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """--account limits the sweep to that account."""
    path = sweep_config(ems_sim, tmp_path)
    code, out, err = await killswitch(
        "sweep", "-c", str(path), "--reason", "x", "--account", "KRAKEN/JOHN"
    )
    assert code == 0, err
    assert cancelled(ems_sim) == ["KRAKEN/JOHN"]
    assert "1 ok, 0 failed" in out


async def test_cli_sweep_orders_surviving_exits_failure(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """Orders that survive every cancel-all: the account is NOT flat, exit 1."""
    ems_sim.sim.set_fault("COINBASE", survive_cancels=1000)
    path = sweep_config(ems_sim, tmp_path)
    code, out, _ = await killswitch("sweep", "-c", str(path), "--reason", "x")
    assert code == 1
    rows = sweep_rows(out)
    assert rows["COINBASE"][4] == "NO"
    assert rows["COINBASE"][3] == "3"  # the simulator's three open orders
    assert rows["BINANCE"][4] == "yes"
    assert "1 failed" in out


async def test_cli_sweep_bad_api_key_exits_failure(
    ems_sim: RunningSim, tmp_path: Path
) -> None:
    """A 401 from the EMS is an auth_error, never retried; exit 1."""
    ems_sim.sim.fail_next("BINANCE", 1, status=401, reject_reason=None)
    path = sweep_config(ems_sim, tmp_path)
    code, out, _ = await killswitch("sweep", "-c", str(path), "--reason", "x")
    assert code == 1
    assert sweep_rows(out)["BINANCE"][1:3] == ["auth_error", "1"]
    assert cancelled(ems_sim).count("BINANCE") == 1
    assert SECRETS["TEST_COINAPI_KEY"] not in out


def test_cli_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`killswitch status | head -1` is not an error: no traceback, exit 0."""
    doc = {
        "state": "armed", "version": "x", "last_trip": None,
        "accounts": {f"A{i}": {"tripped": False, "in_flight": False,
                               "last_outcome": None, "attempts": 0,
                               "open_orders": None, "flat": None}
                     for i in range(2000)},
    }  # fmt: skip
    body = json.dumps(doc).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("t")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cmd = (
            f"{sys.executable} -m killswitch status --url {url} "
            f"--token-file {token} | head -1"
        )
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", cmd],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("state: armed")
