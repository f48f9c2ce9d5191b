"""`killswitch ems-sim`: parse the flags, serve the simulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from killswitch.sim.app import running_simulator
from killswitch.sim.simulator import DEMO_ACCOUNTS, Simulator

_DEFAULT_LISTEN = "127.0.0.1:9480"
_EXIT_OK = 0
_EXIT_FAILURE = 1
_EXIT_USAGE = 2


class _UsageError(Exception):
    """A flag is unusable; the message names it and the value."""


class _ExitRequestedError(Exception):
    """argparse wants to exit (`--help`); carries the status."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(status)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling `sys.exit`."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ExitRequestedError(status)


def _build_parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="killswitch ems-sim",
        description="A CoinAPI EMS stand-in with in-memory orders and fault injection.",
    )
    parser.add_argument(
        "--listen",
        default=_DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve on; port 0 picks one (default {_DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--accounts",
        default=",".join(DEMO_ACCOUNTS),
        metavar="ID,...",
        help="accounts seeded with orders (others are accepted, with no orders)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require X-CoinAPI-Key equal to this environment variable's value",
    )
    parser.add_argument(
        "--orders-per-account", type=int, default=3, metavar="N", help="default 3"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        metavar="X",
        help="latency added to every EMS request",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="ACCOUNT:KIND[=VALUE]",
        help=(
            "repeatable; KIND is timeout=N, unreachable=N (490), status=CODE[xN], "
            "delay=SECONDS, hang, drop, survive=K, garbage, huge=BYTES, drip=SECONDS"
        ),
    )
    parser.add_argument(
        "--log-requests", action="store_true", help="print one line per request"
    )
    return parser


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        msg = f"--listen: {text!r} is not HOST:PORT"
        raise _UsageError(msg)
    return host, int(port_text)


def _parse_number(flag: str, value: str, kind: Callable[[str], Any]) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if number < 0:
        msg = f"--fault {flag}: {value!r} must be a number >= 0"
        raise _UsageError(msg)
    return number


def _apply_faults(sim: Simulator, flags: list[str]) -> None:
    """Apply every `--fault ACCOUNT:KIND[=VALUE]`; one account's faults add up."""
    standing: dict[str, dict[str, Any]] = {}
    for flag in flags:
        account, _, spec = flag.rpartition(":")
        kind, has_value, value = spec.partition("=")
        if not account:
            msg = f"--fault {flag!r}: expected ACCOUNT:KIND[=VALUE]"
            raise _UsageError(msg)
        settings = standing.setdefault(account, {})
        if kind in {"timeout", "unreachable"} and has_value:
            status = 200 if kind == "timeout" else 490
            sim.fail_next(account, _parse_number(flag, value, int), status=status)
        elif kind == "status" and has_value:
            code_text, _, count_text = value.partition("x")
            code = _parse_number(flag, code_text, int)
            if not 200 <= code <= 599 or code == 200:
                msg = f"--fault {flag!r}: status must be in 201..599"
                raise _UsageError(msg)
            sim.fail_next(
                account, _parse_number(flag, count_text or "1", int), status=code
            )
        elif kind in {"delay", "drip"} and has_value:
            settings[f"{kind}_seconds"] = _parse_number(flag, value, float)
        elif kind == "huge" and has_value:
            settings["huge_body_bytes"] = _parse_number(flag, value, int)
        elif kind == "survive" and has_value:
            settings["survive_cancels"] = _parse_number(flag, value, int)
        elif kind in {"hang", "drop"} and not has_value:
            settings[kind] = True
        elif kind == "garbage" and not has_value:
            settings["garbage_body"] = True
        else:
            msg = f"--fault {flag!r}: unknown kind or missing/unexpected value"
            raise _UsageError(msg)
    for account, settings in standing.items():
        if settings:
            sim.set_fault(account, **settings)


def _build_simulator(args: argparse.Namespace) -> tuple[Simulator, str, int]:
    host, port = _parse_listen(args.listen)
    accounts = [a.strip() for a in args.accounts.split(",") if a.strip()]
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            msg = f"--api-key-env: environment variable {args.api_key_env} is not set"
            raise _UsageError(msg)
    if args.orders_per_account < 0:
        msg = f"--orders-per-account: {args.orders_per_account} must be >= 0"
        raise _UsageError(msg)
    if not args.latency_ms >= 0:
        msg = f"--latency-ms: {args.latency_ms} must be >= 0"
        raise _UsageError(msg)
    sim = Simulator(
        accounts, api_key=api_key, orders_per_account=args.orders_per_account
    )
    sim.set_latency(args.latency_ms / 1000)
    _apply_faults(sim, args.fault)
    return sim, host, port


async def _serve(sim: Simulator, host: str, port: int, *, log_requests: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_simulator(sim, host, port, log_requests=log_requests) as url:
            sys.stdout.write(
                f"ems-sim listening on {url} accounts={len(sim.accounts)}\n"
            )
            sys.stdout.flush()
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def run_from_argv(argv: list[str]) -> int:
    """Run `killswitch ems-sim` with `argv` (the flags only) until SIGINT or SIGTERM.

    Returns:
        0 after a signal, 2 for unusable flags, 1 when the address cannot be bound.
    """
    try:
        args = _build_parser().parse_args(argv)
        sim, host, port = _build_simulator(args)
    except _ExitRequestedError as exc:
        return exc.status
    except (_UsageError, ValueError) as exc:
        sys.stderr.write(f"killswitch ems-sim: error: {exc}\n")
        return _EXIT_USAGE
    try:
        asyncio.run(_serve(sim, host, port, log_requests=args.log_requests))
    except OSError as exc:
        sys.stderr.write(f"killswitch ems-sim: cannot listen on {host}:{port}: {exc}\n")
        return _EXIT_FAILURE
    return _EXIT_OK
