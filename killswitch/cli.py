"""argv -> config -> logging -> asyncio.run(); errors -> ExitCode; the only sys.exit.

Client commands (trip, status, reset) talk to a running daemon's HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import yaml
from prometheus_client import CollectorRegistry

from killswitch import __version__
from killswitch.config import Config, Permission, load_config, redacted
from killswitch.daemon import Daemon
from killswitch.ems import EmsClient, create_session
from killswitch.errors import ConfigError
from killswitch.fanout import Fanout, SweepResult, Trip, resolve_accounts
from killswitch.logging import configure_logging
from killswitch.metrics import Metrics

CLIENT_TIMEOUT_SECONDS = 5.0


class ExitCode(IntEnum):
    """sysexits-style exit codes (SPEC lists what each means)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    SOFTWARE = 70
    CONFIG = 78


class _UsageError(Exception):
    """A command line that cannot work (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="killswitch",
        description="Cancel every open order on every account through the CoinAPI EMS.",
    )
    parser.add_argument(
        "--version", action="version", version=f"killswitch {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", type=Path, required=True)

    check = sub.add_parser(
        "check-config", help="validate and print the effective config"
    )
    check.add_argument("-c", "--config", type=Path, required=True)

    for name, text in (
        ("trip", "trip a running daemon"),
        ("reset", "re-arm a running daemon (needs a reset token)"),
        ("sweep", "run one sweep in this process, without a daemon"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--reason", required=True)
        cmd.add_argument("--account", action="append", dest="accounts", metavar="ID")
    status = sub.add_parser("status", help="print the daemon's state")
    status.add_argument("--json", action="store_true", help="print JSON")
    for name in ("trip", "reset", "status"):
        cmd = sub.choices[name]
        cmd.add_argument("-c", "--config", type=Path)
        cmd.add_argument("--url", help="daemon base URL, instead of -c")
        cmd.add_argument(
            "--token-file", type=Path, help="bearer token file, instead of -c"
        )
    sub.choices["sweep"].add_argument("-c", "--config", type=Path, required=True)

    sim = sub.add_parser("ems-sim", help="run the built-in CoinAPI EMS simulator",
                         add_help=False)  # fmt: skip
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `killswitch` command."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: list[str]) -> int:
    """Run one command; returns its exit code."""
    if argv and argv[0] == "ems-sim":
        from killswitch.sim import run_from_argv  # only this command needs it

        return run_from_argv(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, a bad command line 2
        return int(exc.code or 0)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(
            f"killswitch: config error in {getattr(args, 'config', '?')}:",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    except _UsageError as exc:
        print(f"killswitch: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except BrokenPipeError:
        # The reader went away (`killswitch status | head`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except Exception:  # noqa: BLE001 - a bug: print it whole and exit EX_SOFTWARE
        traceback.print_exc()
        return ExitCode.SOFTWARE


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "check-config":
        cfg = load_config(args.config)
        for warning in cfg.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
        return ExitCode.OK
    if command == "run":
        cfg = load_config(args.config)
        configure_logging(cfg.log)
        return asyncio.run(Daemon(args.config, cfg).run())
    if command == "sweep":
        cfg = load_config(args.config)
        configure_logging(cfg.log)
        result = asyncio.run(sweep_once(cfg, args.accounts, args.reason))
        _print_sweep(result)
        return ExitCode.OK if not result.failed else ExitCode.FAILURE
    return _client(args)


async def sweep_once(
    cfg: Config, accounts: list[str] | None, reason: str
) -> SweepResult:
    """One sweep in this process with the daemon's engine (for when it is down)."""
    chosen, notes = resolve_accounts(accounts, cfg.account_ids)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    timeout_seconds = max(e.timeout_seconds for e in cfg.ems.values())
    async with create_session(len(cfg.accounts), timeout_seconds) as session:
        client = EmsClient(session, cfg.ems, cfg.accounts)
        metrics = Metrics(CollectorRegistry())
        async with Fanout(client, cfg.retry, cfg.sweep, metrics) as fanout:
            trip = Trip(
                trip_id=f"cli-{int(time.time())}", source="cli", reason=reason,
                accounts=chosen, seen_monotonic=time.monotonic(), seen_time=time.time(),
                actor="cli", notes=notes,
            )  # fmt: skip
            return await fanout.sweep(trip)


def _print_sweep(result: SweepResult) -> None:
    rows = [("ACCOUNT", "OUTCOME", "ATTEMPTS", "OPEN", "FLAT", "ERROR")]
    for account, r in result.accounts.items():
        flat = "-" if r.flat is None else ("yes" if r.flat else "NO")
        rows.append((
            account, r.outcome, str(r.attempts),
            "?" if r.open_orders is None else str(r.open_orders), flat, r.error or "",
        ))  # fmt: skip
    _print_table(rows)
    print(
        f"\n{len(result.ok)} ok, {len(result.failed)} failed, "
        f"{result.duration_seconds:.3f} s"
    )


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) for cell, w in zip(row, widths, strict=True)
            ).rstrip()
        )


_PERMISSION_OF: dict[str, Permission] = {
    "trip": "trip",
    "reset": "reset",
    "status": "status",
}


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    """Base URL and bearer token for a client command."""
    permission = _PERMISSION_OF[args.command]
    url: str | None = args.url
    token: str | None = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            msg = f"--token-file {args.token_file}: {reason}"
            raise _UsageError(msg) from exc
        if not token:
            msg = f"--token-file {args.token_file}: the file is empty"
            raise _UsageError(msg)
    if args.config is not None:
        cfg = load_config(args.config, client=True)
        if url is None:
            url = _daemon_url(cfg.api.host, cfg.api.port)
        if token is None:
            token = next(
                (t.token for t in cfg.api.tokens if permission in t.permissions), None
            )
            if token is None:
                msg = (
                    f"{args.config}: no api.tokens entry has the {permission!r} "
                    f"permission that {args.command} needs"
                )
                raise _UsageError(msg)
    if url is None:
        msg = "give -c FILE, or --url URL with --token-file FILE"
        raise _UsageError(msg)
    if token is None:
        msg = f"--url needs --token-file (a token with the {permission!r} permission)"
        raise _UsageError(msg)
    return url.rstrip("/"), token


def _daemon_url(host: str, port: int) -> str:
    # A wildcard listen address is reached through loopback.
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
    host = wildcards.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _BadAnswerError(Exception):
    """The daemon's URL answered with something that is not our JSON."""


def _request(url: str, token: str, method: str, body: dict[str, Any] | None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - our own daemon's URL
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_SECONDS) as resp:  # noqa: S310
        raw = resp.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        msg = f"{url} did not answer JSON: is that the killswitch daemon?"
        raise _BadAnswerError(msg) from exc


def _client(args: argparse.Namespace) -> int:
    base, token = _endpoint(args)
    command: str = args.command
    try:
        if command == "status":
            doc = _request(f"{base}/v1/status", token, "GET", None)
        else:
            body: dict[str, Any] = {"reason": args.reason}
            if args.accounts:
                body["accounts"] = args.accounts
            doc = _request(f"{base}/v1/{command}", token, "POST", body)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        print(
            f"killswitch: {command} refused by {base}: {exc.code} {detail}",
            file=sys.stderr,
        )
        return ExitCode.FAILURE
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"killswitch: daemon unreachable at {base}: {reason}", file=sys.stderr)
        if command == "trip":
            config = args.config if args.config is not None else "CONFIG"
            print(
                "killswitch: to cancel without the daemon, run:\n"
                f"  killswitch sweep -c {config} --reason {json.dumps(args.reason)}",
                file=sys.stderr,
            )
        return ExitCode.FAILURE
    except _BadAnswerError as exc:
        print(f"killswitch: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    # Printing is outside the try: a closed stdout is not an unreachable daemon.
    if command == "status":
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            _print_status(doc)
        return ExitCode.OK
    if command == "trip":
        print(f"tripped: trip_id={doc['trip_id']} accounts={','.join(doc['accounts'])}")
    else:
        print(f"reset: {','.join(doc['reset']) or '(none)'} state={doc['state']}")
    for note in doc.get("notes", []):
        print(f"note: {note}")
    return ExitCode.OK


def _print_status(doc: dict[str, Any]) -> None:
    last = doc.get("last_trip")
    print(f"state: {doc['state']}   version: {doc['version']}")
    if last:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last["time"]))
        print(
            f"last trip: {last['trip_id']} {last['source']} at {when}: {last['reason']}"
        )
    rows = [
        ("ACCOUNT", "TRIPPED", "SWEEPING", "LAST OUTCOME", "ATTEMPTS", "OPEN", "FLAT")
    ]
    for account, a in doc["accounts"].items():
        flat = "-" if a["flat"] is None else ("yes" if a["flat"] else "NO")
        rows.append((
            account, "yes" if a["tripped"] else "no", "yes" if a["in_flight"] else "",
            a["last_outcome"] or "-", str(a["attempts"]),
            "-" if a["open_orders"] is None else str(a["open_orders"]), flat,
        ))  # fmt: skip
    _print_table(rows)
    if doc.get("halt_file"):
        print(f"halt file: {doc['halt_file']}")
    for key in ("persistence_error", "audit_error"):
        if doc.get(key):
            print(f"WARNING {key.replace('_', ' ')}: {doc[key]}")
